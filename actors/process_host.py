"""host="process": an actor alone in a fresh Python process, served over ipc://.

The parent starts `python -m greenroom.actors.process_main`, writes a
`ProcessSpec` (msgpack) to its stdin and keeps stdin open as the lifeline:
closing it (or the parent dying) makes the child stop its actor and exit. The
child reports "ok" or its start error on a status pipe and keeps that pipe open
until it exits, so EOF on it tells the parent the process is gone, without a
watcher thread. Exit code 0 means stopped, anything else crashed.

Constructor arguments must be msgspec-encodable. A top-level Struct argument is
rebuilt as its own type; an ActorRef argument becomes a ref to the same actor,
reached over ipc://.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from greenroom.actors.cell import State
from greenroom.actors.errors import ActorCrashed
from greenroom.actors.mailbox import call_on
from greenroom.logging import get_logger

log = get_logger(__name__)

REF_ARG = "@ref"


class Arg(msgspec.Struct, array_like=True):
    type_path: str  # "" plain data, REF_ARG an actor address, else "module:QualName"
    data: bytes


class ProcessSpec(msgspec.Struct, array_like=True):
    factory: str
    name: str
    address: str
    args: list[Arg] = []
    kwargs: dict[str, Arg] = {}
    mailbox_size: int | None = None
    log_format: str = "auto"
    log_level: str = "info"
    log_stream: str = "stdout"
    sys_path: list[str] = []


def import_path(path: str) -> Any:
    """'pkg.module:Name.attr' -> the object."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not qualname:
        raise ValueError(f"expected 'package.module:Name', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def encode_arg(value: Any, ref_address: Callable[[Any], str | None]) -> Arg:
    address = ref_address(value)
    if address is not None:
        return Arg(REF_ARG, address.encode())
    try:
        data = msgspec.msgpack.encode(value)
    except TypeError as exc:
        raise TypeError(f"process actor arguments must be msgspec-encodable: {exc}") from exc
    if isinstance(value, msgspec.Struct):
        cls = type(value)
        return Arg(f"{cls.__module__}:{cls.__qualname__}", data)
    return Arg("", data)


def decode_arg(arg: Arg) -> Any:
    if arg.type_path in ("", REF_ARG):
        return msgspec.msgpack.decode(arg.data)
    return msgspec.msgpack.decode(arg.data, type=import_path(arg.type_path))


class ProcessHost:
    """The parent's handle on one actor process."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.state = State.STARTING
        self.exit_error: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self._status_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_callbacks: list[tuple[asyncio.AbstractEventLoop, Callable]] = []
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self.state in (State.STARTING, State.RUNNING)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, spec: ProcessSpec, timeout: float) -> None:
        self._loop = loop = asyncio.get_running_loop()
        status_r, status_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "greenroom.actors.process_main", str(status_w)],
                stdin=subprocess.PIPE,
                pass_fds=(status_w,),
                close_fds=True,
            )
        finally:
            os.close(status_w)
        self._status_fd = status_r
        payload = msgspec.msgpack.encode(spec)
        assert self._proc.stdin is not None
        self._proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
        self._proc.stdin.flush()
        status = loop.create_future()
        loop.add_reader(status_r, self._on_status, status)
        try:
            reply = await asyncio.wait_for(status, timeout)
        except TimeoutError:
            await self.terminate(grace_s=0.5)
            raise ActorCrashed(
                f"process actor {self.name!r} did not start in {timeout:g} s"
            ) from None
        if reply != b"ok":
            await self._reap(grace_s=2.0)
            raise ActorCrashed(f"process actor {self.name!r} failed to start: {reply.decode()}")
        self.state = State.RUNNING

    def _on_status(self, status: asyncio.Future) -> None:
        try:
            data = os.read(self._status_fd, 65536)
        except OSError:
            data = b""
        if data and not status.done():
            status.set_result(data)
            return
        if data:
            return
        # EOF: the process is gone (or is exiting).
        self._loop.remove_reader(self._status_fd)
        if not status.done():
            status.set_result(b"process exited before it was ready")
        if self.state is State.RUNNING:
            self._loop.create_task(self._reap(grace_s=5.0))

    async def _reap(self, grace_s: float) -> None:
        """Wait for the exit code after the status pipe closed, then report the exit."""
        proc = self._proc
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._close_fds()
        crashed = proc.returncode != 0 and not (self._stopping and proc.returncode < 0)
        if crashed:
            self.exit_error = ActorCrashed(f"process exited with code {proc.returncode}")
            log.error("process actor exited", actor=self.name, code=proc.returncode)
        was_alive = self.alive
        self.state = State.CRASHED if crashed else State.STOPPED
        if was_alive:
            callbacks, self._exit_callbacks = self._exit_callbacks, []
            for loop, fn in callbacks:
                call_on(loop, fn, self)

    def _close_fds(self) -> None:
        if self._status_fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._status_fd)
            os.close(self._status_fd)
            self._status_fd = -1
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def request_stop(self) -> None:
        """Close the lifeline: the child stops its actor and exits."""
        self._stopping = True
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def add_exit_callback(self, fn: Callable, loop: asyncio.AbstractEventLoop) -> None:
        if self.alive:
            self._exit_callbacks.append((loop, fn))
        else:
            call_on(loop, fn, self)

    async def wait_exit(self) -> None:
        if not self.alive:
            return
        done = asyncio.get_running_loop().create_future()
        self.add_exit_callback(lambda _h: done.done() or done.set_result(None), self._loop)
        await done

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._stopping = True
            self._proc.kill()

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after grace_s; returns once the process is reaped."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.poll() is None:
            proc.terminate()
        await self._reap(grace_s)
