"""The node runtime: hosts actors on loops, threads or processes; shuts all down.

One Runtime per process; it owns the process's zmq Context. `spawn` places an
actor on the caller's loop (host="loop"), on its own thread with its own uvloop
(host="thread"), or in its own process served over ipc:// (host="process").
`shutdown` stops every actor (on_stop runs), joins threads, reaps processes,
closes every socket and terminates the context, within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import zmq

from greenroom.actors.actor import Actor
from greenroom.actors.cell import ActorCell, State
from greenroom.actors.errors import ActorCrashed, ActorError, ActorStopped
from greenroom.actors.loop_thread import LoopThread
from greenroom.actors.process_host import (
    REF_ARG,
    Arg,
    ProcessHost,
    ProcessSpec,
    encode_arg,
    import_path,
)
from greenroom.actors.ref import ActorRef, LocalTarget, RemoteTarget
from greenroom.actors.remote import ActorServer, LinkPool
from greenroom.bus.transport import DEFAULT_HWM, Transport, new_context
from greenroom.logging import get_logger, logging_settings

if TYPE_CHECKING:
    from greenroom.actors.supervisor import Supervisor

log = get_logger(__name__)

Host = Literal["loop", "thread", "process"]
IPC_DIR_PREFIX = "greenroom-"
Entry = ActorCell | ProcessHost


@dataclass
class SpawnSpec:
    """Everything needed to (re)start an actor."""

    factory: Callable[..., Actor] | str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    host: Host = "loop"
    mailbox_size: int | None = None
    threads: list[LoopThread] = field(default_factory=list, repr=False)


class Runtime:
    live_runtimes = 0  # of this process; the last one out stops pyzmq's gc thread

    def __init__(self, *, hwm: int = DEFAULT_HWM, start_timeout_s: float = 120.0) -> None:
        self.context: zmq.Context = new_context()
        self.hwm = hwm
        self.start_timeout_s = start_timeout_s
        self.links = LinkPool(self.transport)
        self._transports: dict[asyncio.AbstractEventLoop, Transport] = {}
        self._entries: dict[str, Entry] = {}
        self._refs: dict[str, ActorRef] = {}
        self._servers: dict[str, list[ActorServer]] = {}
        self._exposed: dict[str, list[str]] = {}
        self._threads: list[LoopThread] = []
        self._supervisors: list[Supervisor] = []
        self._ipc_dir: str | None = None
        self.closing = False
        self.closed = False
        Runtime.live_runtimes += 1

    # ------------------------------------------------------------------ lookup

    def transport(self, loop: asyncio.AbstractEventLoop | None = None) -> Transport:
        """This runtime's transport on loop (default: the running loop)."""
        loop = loop or asyncio.get_running_loop()
        transport = self._transports.get(loop)
        if transport is None:
            transport = self._transports[loop] = Transport(self.context, loop, hwm=self.hwm)
        return transport

    def ipc_address(self, name: str) -> str:
        if self._ipc_dir is None:
            clean_stale_ipc_dirs()
            self._ipc_dir = tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-")
        return f"ipc://{self._ipc_dir}/{name}.sock"

    def cell(self, name: str) -> Entry:
        return self._entries[name]

    def ref(self, name: str) -> ActorRef:
        return self._refs[name]

    # ------------------------------------------------------------------ spawn

    async def spawn(
        self,
        factory: Callable[..., Actor] | str,
        *args: Any,
        name: str,
        host: Host = "loop",
        mailbox_size: int | None = None,
        **kwargs: Any,
    ) -> ActorRef:
        """Start an actor; returns once its on_start finished (raises ActorCrashed if not)."""
        if self.closing:
            raise ActorStopped("runtime is shutting down")
        if name in self._entries and self._entries[name].alive:
            raise ValueError(f"an actor named {name!r} is already running")
        if host not in ("loop", "thread", "process"):
            raise ValueError(f"host must be loop, thread or process, not {host!r}")
        spec = SpawnSpec(factory, args, kwargs, name, host, mailbox_size)
        ref = ActorRef(name, _NotStarted(name))
        await self.start_incarnation(spec, ref)
        return ref

    async def start_incarnation(self, spec: SpawnSpec, ref: ActorRef) -> Entry:
        """Start spec's actor and point ref at it (also how supervisors restart)."""
        self._refs[spec.name] = ref
        if spec.host == "process":
            entry: Entry = await self._start_process(spec, ref)
        elif spec.host == "thread":
            entry = await self._start_thread(spec, ref)
        else:
            entry = await self._start_local(spec, ref)
        for address in self._exposed.get(spec.name, []):
            if isinstance(entry, ActorCell):
                await self._bind_with_retry(entry, address)
        return entry

    def _construct(self, spec: SpawnSpec, ref: ActorRef, loop) -> ActorCell:
        factory = import_path(spec.factory) if isinstance(spec.factory, str) else spec.factory
        actor = factory(*spec.args, **spec.kwargs)
        if not isinstance(actor, Actor):
            raise TypeError(f"{spec.factory!r} made a {type(actor).__name__}, not an Actor")
        cell = ActorCell(actor, spec.name, loop, spec.mailbox_size or actor.mailbox_size)
        actor.runtime = self
        actor.ref = ref
        ref._target = LocalTarget(cell)
        self._entries[spec.name] = cell
        cell.add_exit_callback(self._on_cell_exit, loop)
        return cell

    async def _start_local(self, spec: SpawnSpec, ref: ActorRef) -> ActorCell:
        cell = self._construct(spec, ref, asyncio.get_running_loop())
        await cell.start()
        return cell

    async def _start_thread(self, spec: SpawnSpec, ref: ActorRef) -> ActorCell:
        thread = LoopThread(spec.name)
        self._threads.append(thread)

        async def boot() -> ActorCell:
            try:
                cell = self._construct(spec, ref, thread.loop)
            except BaseException:
                thread.stop()
                raise
            cell.add_exit_callback(lambda _c: self._close_thread_loop(thread), thread.loop)
            await cell.start()
            return cell

        return await asyncio.wrap_future(thread.submit(boot()))

    def _close_thread_loop(self, thread: LoopThread) -> None:
        self._close_loop_sockets(thread.loop)
        thread.stop()

    async def _start_process(self, spec: SpawnSpec, ref: ActorRef) -> ProcessHost:
        factory = spec.factory
        if not isinstance(factory, str):
            factory = f"{factory.__module__}:{factory.__qualname__}"
        address = self.ipc_address(spec.name)
        settings = logging_settings()
        pspec = ProcessSpec(
            factory=factory,
            name=spec.name,
            address=address,
            args=[await self._encode_arg(a) for a in spec.args],
            kwargs={k: await self._encode_arg(v) for k, v in spec.kwargs.items()},
            mailbox_size=spec.mailbox_size,
            log_format=settings["fmt"],
            log_level=settings["level"],
            log_stream=settings["stream"],
            sys_path=[p for p in sys.path if p],
        )
        host = ProcessHost(spec.name, address)
        self._entries[spec.name] = host
        try:
            await host.start(pspec, self.start_timeout_s)
        except BaseException:
            self._forget(host)
            raise
        target = RemoteTarget(address, self.links)
        ref._target = target
        host.add_exit_callback(self._on_process_exit(target), asyncio.get_running_loop())
        return host

    def _on_process_exit(self, target: RemoteTarget) -> Callable[[ProcessHost], None]:
        def on_exit(host: ProcessHost) -> None:
            crashed = host.state is State.CRASHED
            error: ActorError = (
                ActorCrashed(f"actor {host.name!r} crashed: {host.exit_error}")
                if crashed
                else ActorStopped(f"actor {host.name!r} stopped")
            )
            target.dead = error
            self.links.fail(host.address, error)
            self.links.discard(host.address)
            self._forget(host)

        return on_exit

    async def _encode_arg(self, value: Any) -> Arg:
        if isinstance(value, ActorRef):
            return Arg(REF_ARG, (await self.address_of(value, "ipc")).encode())
        return encode_arg(value, lambda _v: None)

    def _on_cell_exit(self, cell: ActorCell) -> None:
        for server in self._servers.pop(cell.name, []):
            if server.cell is cell:
                server.close()
        self._forget(cell)

    def _forget(self, entry: Entry) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]

    # ------------------------------------------------------------------ addresses

    async def expose(self, ref: ActorRef, address: str) -> str:
        """Serve a local actor on address (ROUTER); returns the bound address
        (tcp://127.0.0.1:0 picks a free port). Kept across supervisor restarts."""
        cell = self._local_cell(ref)
        bound = await self._on_loop(cell.loop, self._bind(cell, address))
        self._exposed.setdefault(ref.name, []).append(bound)
        return bound

    async def connect(self, address: str, *, name: str | None = None) -> ActorRef:
        """A ref to an actor exposed at address (one DEALER per loop and address)."""
        return ActorRef(name or address, RemoteTarget(address, self.links))

    async def address_of(self, ref: ActorRef, scheme: str = "ipc") -> str:
        """An address other processes can reach ref at (exposing it on ipc:// if needed)."""
        target = ref._target
        if isinstance(target, RemoteTarget):
            return target.address
        for address in self._exposed.get(ref.name, []):
            if not address.startswith("inproc://"):
                return address
        return await self.expose(ref, self.ipc_address(ref.name))

    def _local_cell(self, ref: ActorRef) -> ActorCell:
        target = ref._target
        if not isinstance(target, LocalTarget):
            raise ValueError(f"{ref!r} is not an actor of this process")
        return target.cell

    async def _bind(self, cell: ActorCell, address: str) -> str:
        server = ActorServer(cell, self.transport(), address)
        self._servers.setdefault(cell.name, []).append(server)
        if not cell.alive:
            self._on_cell_exit(cell)
        return server.address

    async def _bind_with_retry(self, cell: ActorCell, address: str) -> None:
        deadline = time.monotonic() + 2.0
        while True:
            try:
                await self._on_loop(cell.loop, self._bind(cell, address))
                return
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)  # the old incarnation's socket is closing

    @staticmethod
    async def _on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
        if loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    # ------------------------------------------------------------------ stop

    async def stop(self, ref: ActorRef, timeout: float = 5.0) -> None:
        """Stop one actor: it finishes the message in hand, runs on_stop and exits."""
        entry = self._entries.get(ref.name)
        if entry is None:
            return
        await self._stop_entries([entry], timeout)

    async def _stop_entries(self, entries: list[Entry], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for entry in entries:
            entry.request_stop()
        pending = await _wait_exits(entries, timeout * 0.6)
        for entry in pending:
            log.warning("actor did not stop in time; killing it", actor=entry.name)
            if isinstance(entry, ProcessHost):
                await entry.terminate(grace_s=max(0.1, (deadline - time.monotonic()) / 2))
            else:
                entry.kill()
        await _wait_exits(pending, max(0.05, deadline - time.monotonic()))

    def register_supervisor(self, supervisor: Supervisor) -> None:
        self._supervisors.append(supervisor)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop everything within timeout: actors, threads, processes, sockets, context."""
        if self.closed or self.closing:
            return
        self.closing = True
        deadline = time.monotonic() + timeout
        for supervisor in self._supervisors:
            supervisor.cancel_pending()
        await self._stop_entries(list(self._entries.values()), timeout * 0.7)
        for supervisor in self._supervisors:
            supervisor.forget_children()
        for thread in self._threads:
            thread.stop()
        for thread in self._threads:
            if not thread.join(max(0.05, deadline - time.monotonic())):
                log.error("actor thread did not exit", thread=thread.thread.name)
        self._threads = [t for t in self._threads if t.thread.is_alive()]
        for loop in list(self._transports):
            if loop is asyncio.get_running_loop() or loop.is_closed():
                self._close_loop_sockets(loop)
        self._terminate_context()
        self.closed = True
        Runtime.live_runtimes -= 1
        if Runtime.live_runtimes == 0:
            _stop_zmq_gc()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _close_loop_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close every server, link and channel on loop (call on that loop)."""
        for servers in list(self._servers.values()):
            for server in [s for s in servers if s.loop is loop]:
                server.close()
        self.links.close_loop(loop)
        transport = self._transports.pop(loop, None)
        if transport is not None:
            transport.close()

    def _terminate_context(self) -> None:
        if self._threads:
            # A stuck thread may still own sockets: terminating would hang.
            log.error("zmq context left open: actor threads still running")
            return
        open_sockets = [s for s in list(getattr(self.context, "_sockets", ())) if not s.closed]
        if open_sockets:
            log.warning("closing sockets left open at shutdown", count=len(open_sockets))
            for sock in open_sockets:
                sock.close(linger=0)
        self.context.term()


class _NotStarted:
    """The target of a ref whose actor has not started yet."""

    def __init__(self, name: str) -> None:
        self.error = ActorStopped(f"actor {name!r} is not running")

    async def tell(self, msg: Any) -> None:
        raise self.error

    def tell_nowait(self, msg: Any) -> None:
        raise self.error

    async def ask(self, msg: Any, timeout: float) -> Any:
        raise self.error


async def _wait_exits(entries: list[Entry], timeout: float) -> list[Entry]:
    """Wait until the entries exit or timeout passes; returns those still alive."""
    alive = [e for e in entries if e.alive]
    if alive:
        waits = [asyncio.ensure_future(e.wait_exit()) for e in alive]
        _done, not_done = await asyncio.wait(waits, timeout=timeout)
        for fut in not_done:
            fut.cancel()
    return [e for e in alive if e.alive]


def _stop_zmq_gc() -> None:
    """pyzmq starts a helper thread for zero-copy sends; stop it with the last runtime."""
    with contextlib.suppress(Exception):
        from zmq.utils.garbage import gc

        if gc.is_alive():
            gc.stop()


def clean_stale_ipc_dirs(root: str | None = None, min_age_s: float = 60.0) -> list[str]:
    """Remove socket folders that runtimes killed without a shutdown (kill -9) left behind:
    ours, named after a process that no longer exists (or, unnamed, older than ``min_age_s``),
    with no socket anyone listens on."""
    root = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(IPC_DIR_PREFIX):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
                continue
            pid = name[len(IPC_DIR_PREFIX) :].split("-", 1)[0]
            if pid.isdigit():
                if _process_alive(int(pid)):
                    continue
            elif time.time() - st.st_mtime < min_age_s:
                continue
            if any(_listening(os.path.join(path, f)) for f in os.listdir(path)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue
    if removed:
        log.info("removed stale socket folders", count=len(removed))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(path: str) -> bool:
    import socket

    if not path.endswith(".sock"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True
