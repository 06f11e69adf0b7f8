"""Node runtime: the same actors over inproc/ipc/tcp, process hosting, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from greenroom.actors import (
    Actor,
    ActorCrashed,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    Runtime,
    handles,
)
from greenroom.bus.codec import encode
from greenroom.bus.envelope import Kind, pack_header
from greenroom.bus.messages import Message

# Process-hosted actors are imported by path in the child ("test_actor_runtime:...").
sys.path.insert(0, str(Path(__file__).parent))


class RtPing(Message):
    seq: int
    hops: int = 0


class RtBlob(Message):
    data: np.ndarray


class RtSleep(Message):
    seconds: float


class Ponger(Actor):
    def __init__(self, offset: int = 1) -> None:
        self.offset = offset

    @handles(RtPing)
    def ping(self, msg: RtPing) -> RtPing:
        return RtPing(seq=msg.seq + self.offset, hops=msg.hops + 1)

    @handles(RtBlob)
    def blob(self, msg: RtBlob) -> RtBlob:
        return RtBlob(data=msg.data)

    @handles(RtSleep)
    def block(self, msg: RtSleep) -> None:
        time.sleep(msg.seconds)  # a handler that blocks its loop (e.g. a GPU call)


class Pinger(Actor):
    """Asks a peer ref (local, remote or in another process) and adds a hop."""

    def __init__(self, peer) -> None:
        self.peer = peer

    @handles(RtPing)
    async def relay(self, msg: RtPing) -> RtPing:
        reply = await self.peer.ask(RtPing(seq=msg.seq, hops=msg.hops + 1), timeout=5.0)
        return reply


def resources() -> tuple[int, int, list[str]]:
    """(threads of this process incl. native, open sockets/eventfds, child pids)."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "anon_inode:[eventfd]", "anon_inode:[eventpoll]")):
            fds += 1
    children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
    return len(os.listdir("/proc/self/task")), fds, children


@pytest.mark.parametrize(
    "scheme", ["inproc://ping-{n}", "ipc://{tmp}/ping-{n}.sock", "tcp://127.0.0.1:0"]
)
@pytest.mark.parametrize("host", ["loop", "thread"])
async def test_same_ping_pong_actors_over_every_transport(scheme, host, tmp_path) -> None:
    rt = Runtime()
    try:
        ponger = await rt.spawn(Ponger, name="ponger", host=host)
        address = await rt.expose(ponger, scheme.format(n=host, tmp=tmp_path))
        remote = await rt.connect(address)
        pinger = await rt.spawn(Pinger, remote, name="pinger")
        for seq in range(50):
            assert await pinger.ask(RtPing(seq=seq), timeout=5.0) == RtPing(seq=seq + 1, hops=2)
        replies = await asyncio.gather(
            *(remote.ask(RtPing(seq=i), timeout=5.0) for i in range(200))
        )
        assert [r.seq for r in replies] == list(range(1, 201))
    finally:
        await rt.shutdown(timeout=5.0)


async def test_16_mib_array_over_ipc_is_byte_exact(tmp_path) -> None:
    rt = Runtime()
    try:
        ponger = await rt.spawn(Ponger, name="blob", host="thread")
        remote = await rt.connect(await rt.expose(ponger, f"ipc://{tmp_path}/blob.sock"))
        data = np.random.default_rng(1).integers(0, 256, size=16 << 20, dtype=np.uint8)
        reply = await remote.ask(RtBlob(data=data), timeout=10.0)
        assert reply.data.nbytes == 16 << 20
        assert reply.data.tobytes() == data.tobytes()
    finally:
        await rt.shutdown(timeout=5.0)


async def test_malformed_frames_do_not_kill_the_receiver(tmp_path) -> None:
    rt = Runtime()
    try:
        ponger = await rt.spawn(Ponger, name="sturdy")
        address = await rt.expose(ponger, f"ipc://{tmp_path}/sturdy.sock")
        raw = rt.transport().connect_dealer(address)
        ask = pack_header(Kind.ASK, 7)
        for frames in (
            [b"garbage"],
            [b"\x09" * 9, b"x"],  # unknown kind
            [pack_header(Kind.TELL), b"\xc1"],
            [ask, b"\x92\xa9NoSuchMsg\x01"],
            [pack_header(Kind.TELL), *encode(RtPing(seq=1))[:1], b"extra"],
        ):
            await raw.send(frames)
        # An undecodable ask is answered with a failure, not dropped silently.
        kind_frame, *_ = await asyncio.wait_for(raw.recv(), 2.0)
        assert bytes(kind_frame)[0] == Kind.FAILURE
        remote = await rt.connect(address)
        assert await remote.ask(RtPing(seq=41), timeout=2.0) == RtPing(seq=42, hops=1)
        assert rt.cell("sturdy").alive
    finally:
        await rt.shutdown(timeout=5.0)


async def test_process_actor_with_a_ref_back_to_the_parent() -> None:
    rt = Runtime()
    try:
        local = await rt.spawn(Ponger, 100, name="parent-ponger")
        relay = await rt.spawn(
            "test_actor_runtime:Pinger", local, name="child-pinger", host="process"
        )
        reply = await relay.ask(RtPing(seq=1), timeout=10.0)
        assert reply == RtPing(seq=101, hops=2)
        data = np.arange(1 << 18, dtype=np.float32)
        child = await rt.spawn("test_actor_runtime:Ponger", name="child-ponger", host="process")
        back = await child.ask(RtBlob(data=data), timeout=10.0)
        np.testing.assert_array_equal(back.data, data)
        pid = rt.cell("child-ponger").pid
    finally:
        await rt.shutdown(timeout=10.0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ActorStopped):
        await child.ask(RtPing(seq=1), timeout=1.0)


async def test_killed_process_fails_pending_asks_with_crashed() -> None:
    rt = Runtime()
    try:
        ref = await rt.spawn(Ponger, name="victim", host="process")
        pending = asyncio.create_task(ref.ask(RtSleep(seconds=5.0), timeout=10.0))
        await asyncio.sleep(0.2)
        os.kill(rt.cell("victim").pid, signal.SIGKILL)  # dies on its own, unasked
        with pytest.raises(ActorCrashed):
            await asyncio.wait_for(pending, 5.0)
        with pytest.raises(ActorCrashed):
            await ref.ask(RtPing(seq=1), timeout=1.0)
    finally:
        await rt.shutdown(timeout=5.0)


async def test_shutdown_leaves_no_thread_process_or_socket(tmp_path) -> None:
    before_threads, before_fds, before_children = resources()
    py_threads = set(threading.enumerate())
    rt = Runtime()
    a = await rt.spawn(Ponger, name="a", host="thread")
    b = await rt.spawn(Ponger, name="b", host="process")
    c = await rt.spawn(Pinger, b, name="c")
    await rt.expose(a, "tcp://127.0.0.1:0")
    remote = await rt.connect(await rt.expose(a, f"ipc://{tmp_path}/a.sock"))
    assert (await c.ask(RtPing(seq=1), timeout=10.0)).seq == 2
    assert (await remote.ask(RtBlob(data=np.zeros(1 << 20)), timeout=5.0)).data.size == 1 << 20
    ipc_dir = Path(rt.ipc_address("x")[len("ipc://") :]).parent
    assert resources()[0] > before_threads
    started = time.monotonic()
    await rt.shutdown(timeout=5.0)
    assert time.monotonic() - started < 5.0
    assert set(threading.enumerate()) == py_threads
    assert resources() == (before_threads, before_fds, before_children)
    assert not ipc_dir.exists()
    assert rt.context.closed


async def test_shutdown_is_bounded_with_a_blocked_process_actor() -> None:
    rt = Runtime()
    ref = await rt.spawn(Ponger, name="stuck", host="process")
    pid = rt.cell("stuck").pid
    ref.tell_nowait(RtSleep(seconds=30.0))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await rt.shutdown(timeout=1.0)
    assert time.monotonic() - started < 2.0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_ask_to_an_address_nobody_serves_times_out(tmp_path) -> None:
    rt = Runtime()
    try:
        ghost = await rt.connect(f"ipc://{tmp_path}/nobody.sock")
        with pytest.raises(AskTimeout):
            await ghost.ask(RtPing(seq=1), timeout=0.1)
    finally:
        await rt.shutdown(timeout=2.0)


async def test_remote_tell_backpressure_reaches_the_sender(tmp_path) -> None:
    rt = Runtime(hwm=4)
    try:
        ref = await rt.spawn(Ponger, name="slow", host="thread", mailbox_size=2)
        remote = await rt.connect(await rt.expose(ref, f"ipc://{tmp_path}/slow.sock"))
        await remote.tell(RtSleep(seconds=3.5))
        sent, refused = 0, False
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                remote.tell_nowait(RtPing(seq=sent))
                sent += 1
            except MailboxFull:
                refused = True
                break
            await asyncio.sleep(0)
        # the mailbox (2), the zmq queues (HWM 4 each side) and the kernel's socket buffer fill,
        # then the sender is refused: bounded, however large the OS buffer happens to be
        assert refused, f"{sent} tells accepted without backpressure"
    finally:
        await rt.shutdown(timeout=5.0)


def test_context_is_terminated_even_without_a_running_loop() -> None:
    rt = Runtime()
    asyncio.run(rt.shutdown())
    with pytest.raises(zmq.ZMQError):
        rt.context.socket(zmq.DEALER)


class Hanger(Actor):
    def __init__(self) -> None:
        self.stopped = threading.Event()

    @handles(RtSleep)
    async def hang(self, msg: RtSleep) -> None:
        await asyncio.sleep(msg.seconds)

    async def on_stop(self) -> None:
        self.stopped.set()


async def test_shutdown_is_bounded_with_hanging_handlers() -> None:
    rt = Runtime()
    on_loop = await rt.spawn(Hanger, name="hang-loop")
    in_thread = await rt.spawn(Ponger, name="hang-thread", host="thread")
    on_loop.tell_nowait(RtSleep(seconds=60.0))
    in_thread.tell_nowait(RtSleep(seconds=1.0))  # a blocking call: cannot be interrupted
    actor = rt.cell("hang-loop").actor
    await asyncio.sleep(0.05)
    thread = rt.cell("hang-thread")
    started = time.monotonic()
    await rt.shutdown(timeout=0.5)
    assert time.monotonic() - started < 1.0
    assert actor.stopped.is_set()  # cancelled, then on_stop ran
    await asyncio.wait_for(thread.wait_exit(), 3.0)  # the blocked thread ends on its own
