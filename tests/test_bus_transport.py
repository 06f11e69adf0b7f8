"""Transport: ROUTER/DEALER and PUSH/PULL channels, high-water marks, clean close."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import zmq

from greenroom.bus.codec import decode, encode
from greenroom.bus.messages import Message, TokenDelta
from greenroom.bus.transport import Channel, ChannelClosed, Transport, check_address, new_context


class ArrayMsg(Message):
    array: np.ndarray


@pytest.fixture
async def transport():
    ctx = new_context()
    t = Transport(ctx, hwm=8)
    yield t
    t.close()
    ctx.term()  # would hang if a socket were left open


@pytest.mark.parametrize("address", ["inproc://echo", "ipc://{tmp}/echo.sock", "tcp://127.0.0.1:0"])
async def test_router_dealer_echo(transport: Transport, address: str, tmp_path) -> None:
    router = transport.bind_router(address.format(tmp=tmp_path))
    assert not router.address.endswith(":0")
    dealer = transport.connect_dealer(router.address)
    for i in range(20):
        await dealer.send(encode(TokenDelta(request_id=f"r{i}", token_ids=[i])))
    for i in range(20):
        identity, *frames = await router.recv()
        assert decode(frames) == TokenDelta(request_id=f"r{i}", token_ids=[i])
        await router.send([identity, b"ack", str(i).encode()])
    for i in range(20):
        assert [bytes(f) for f in await dealer.recv()] == [b"ack", str(i).encode()]


async def _twenty_through(dealer, router) -> None:
    for i in range(20):
        await dealer.send([str(i).encode()])
    for i in range(20):
        assert bytes((await router.recv())[1]) == str(i).encode()


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
async def test_a_sender_blocked_on_a_new_connection_always_resumes(scheme: str, tmp_path) -> None:
    """Twenty sends into a fresh connection meet the high-water mark while the connection comes
    up; the room that follows must wake the sender every time (it once slept forever)."""
    for k in range(50):
        ctx = new_context()
        t = Transport(ctx, hwm=8)
        try:
            address = f"ipc://{tmp_path}/r{k}.sock" if scheme == "ipc" else "tcp://127.0.0.1:0"
            router = t.bind_router(address)
            await asyncio.wait_for(_twenty_through(t.connect_dealer(router.address), router), 5.0)
        finally:
            t.close()
            ctx.term()


async def test_push_pull_with_callback_and_large_frames(transport: Transport, tmp_path) -> None:
    got: list[np.ndarray] = []
    done = asyncio.Event()

    def on_frames(frames) -> None:
        got.append(decode(frames).array)
        if len(got) == 3:
            done.set()

    pull = transport.bind_pull(f"ipc://{tmp_path}/pull.sock", on_frames)
    push = transport.connect_push(pull.address)
    for i in range(3):
        await push.send(encode(ArrayMsg(array=np.full(300_000, i, dtype=np.int32))))
    await asyncio.wait_for(done.wait(), 5.0)
    assert [int(a[0]) for a in got] == [0, 1, 2] and all(a.size == 300_000 for a in got)


async def test_paused_reader_pushes_back_on_the_sender(transport: Transport) -> None:
    router = transport.bind_router("inproc://slow")
    dealer = transport.connect_dealer("inproc://slow")
    router.pause_reading()
    sent = 0
    while dealer.try_send([b"x"]) and sent < 10_000:
        sent += 1
        await asyncio.sleep(0)
    assert 8 <= sent < 100  # bounded by the two high-water marks
    blocked = asyncio.create_task(dealer.send([b"last"]))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    router.resume_reading()
    received = [await router.recv() for _ in range(sent + 1)]
    await asyncio.wait_for(blocked, 2.0)
    assert bytes(received[-1][1]) == b"last"


async def test_recv_inbox_is_bounded(transport: Transport) -> None:
    router = transport.bind_router("inproc://inbox")  # never read from: its inbox fills
    dealer = transport.connect_dealer("inproc://inbox")
    sent = 0
    while dealer.try_send([b"x"]) and sent < 10_000:
        sent += 1
        await asyncio.sleep(0)
    assert sent < 100  # the inbox stops reading at its size, then the HWMs apply
    assert len(router._inbox) == 8


async def test_close_wakes_waiters_and_is_idempotent(transport: Transport) -> None:
    router = transport.bind_router("inproc://closing")
    waiter = asyncio.create_task(router.recv())
    await asyncio.sleep(0.01)
    router.close()
    router.close()
    with pytest.raises(ChannelClosed):
        await waiter
    with pytest.raises(ChannelClosed):
        router.try_send([b"x"])


class EdgeSocket:
    """A DEALER stand-in whose fd never fires: state changes (commands) are taken in only
    when ZMQ_EVENTS is read, as zmq does, so a reader that misses one sleeps forever."""

    type = zmq.DEALER

    def __init__(self) -> None:
        self._fds = os.pipe()
        self.FD = self._fds[0]
        self.room = False
        self.commands = 0  # room that arrives with the next read of ZMQ_EVENTS
        self.sent: list[list] = []

    def send_multipart(self, frames, flags=0, copy=True) -> None:
        if not self.room:
            raise zmq.Again()
        self.sent.append(list(frames))

    def get(self, option: int) -> int:
        assert option == zmq.EVENTS
        if self.commands:
            self.commands -= 1
            self.room = True
        return zmq.POLLOUT if self.room else 0

    def close(self, linger=0) -> None:
        for fd in self._fds:
            os.close(fd)


async def test_room_seen_by_a_failed_send_wakes_that_sender() -> None:
    sock = EdgeSocket()
    channel = Channel(sock, asyncio.get_running_loop(), "inproc://edge")
    await asyncio.sleep(0)
    sock.commands = 1  # room comes between the refused send and its look at ZMQ_EVENTS
    await asyncio.wait_for(channel.send([b"x"]), 1.0)
    assert sock.sent == [[b"x"]]
    channel.close()


async def test_room_seen_by_another_send_wakes_the_waiting_sender() -> None:
    sock = EdgeSocket()
    channel = Channel(sock, asyncio.get_running_loop(), "inproc://edge")
    waiting = asyncio.create_task(channel.send([b"first"]))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    sock.commands = 1
    assert not channel.try_send([b"second"])  # refused, but its look at ZMQ_EVENTS finds room
    await asyncio.wait_for(waiting, 1.0)
    assert sock.sent == [[b"first"]]
    channel.close()


def test_only_zeromq_addresses() -> None:
    assert check_address("tcp://127.0.0.1:5555")
    with pytest.raises(ValueError, match="unsupported address"):
        check_address("http://127.0.0.1:80")
