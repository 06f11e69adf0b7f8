"""Start and watch the rank worker processes of one node, one epoch at a time.

Each worker gets its spec on stdin, and stdin stays open as its lifeline: closing it (or this
process dying) ends the worker. An exit is seen at once through a pidfd on the event loop,
with no watcher thread, and reported as ``on_exit(epoch, rank, code)`` (a negative code is
the signal that killed it, as in ``subprocess``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

import msgspec

from greenroom.logging import get_logger
from greenroom.parallel.worker import WorkerSpec

log = get_logger(__name__)

OnExit = Callable[[int, int, int], None]


class LocalRanks:
    def __init__(self, on_exit: OnExit) -> None:
        self.on_exit = on_exit
        self.epoch = 0
        self._procs: dict[int, subprocess.Popen] = {}
        self._pidfds: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self._procs.items()}

    def start(self, spec: WorkerSpec, ranks: list[int] | range) -> None:
        """Start one worker per rank of ``ranks`` for ``spec.epoch`` (after stopping any
        workers of an earlier epoch)."""
        self.kill_all()
        self._loop = asyncio.get_running_loop()
        self.epoch = spec.epoch
        for rank in ranks:
            payload = msgspec.msgpack.encode(msgspec.structs.replace(spec, rank=rank))
            proc = subprocess.Popen(
                [sys.executable, "-m", "greenroom.parallel.worker"],
                stdin=subprocess.PIPE,
                close_fds=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
            proc.stdin.flush()
            self._procs[rank] = proc
            fd = os.pidfd_open(proc.pid)
            self._pidfds[rank] = fd
            self._loop.add_reader(fd, self._exited, spec.epoch, rank)
        log.info("rank workers started", epoch=spec.epoch, ranks=list(ranks))

    def _exited(self, epoch: int, rank: int) -> None:
        proc = self._procs.pop(rank, None)
        self._forget_fd(rank)
        if proc is None:
            return
        code = proc.wait()
        self._close_stdin(proc)
        if epoch == self.epoch:
            self.on_exit(epoch, rank, code)

    def _forget_fd(self, rank: int) -> None:
        fd = self._pidfds.pop(rank, None)
        if fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)

    @staticmethod
    def _close_stdin(proc: subprocess.Popen) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass

    def kill_all(self) -> None:
        """SIGKILL every worker (a rank group cannot run with a rank missing, and ranks
        blocked in a collective do not read messages) and reap them, without reporting."""
        procs, self._procs = self._procs, {}
        for rank in list(self._pidfds):
            self._forget_fd(rank)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in procs.values():
            proc.wait()
            self._close_stdin(proc)

    async def stop_all(self, grace_s: float = 2.0) -> None:
        """Close every lifeline, wait up to ``grace_s`` for the workers to exit, then kill."""
        procs = dict(self._procs)
        for proc in procs.values():
            self._close_stdin(proc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(p.poll() is None for p in procs.values()) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.kill_all()
