"""one_for_one supervision with a restart intensity limit.

A crashed child is restarted alone, into the same ActorRef (asks pending on the
crashed incarnation fail with ActorCrashed; asks sent before the new one is up
fail the same way; over a socket, an ask that reaches the closing server of the
crashed incarnation is lost and times out). More than `max_restarts` crashes within `period_s` seconds
escalate: the supervisor stops every child and calls `on_escalate(reason)` —
normally a clean node shutdown. A child that stops normally is not restarted.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from greenroom.actors.actor import Actor
from greenroom.actors.cell import State
from greenroom.actors.ref import ActorRef
from greenroom.actors.runtime import Entry, Host, Runtime, SpawnSpec
from greenroom.logging import get_logger

log = get_logger(__name__)

EscalateCallback = Callable[[BaseException], Any]


class Supervisor:
    def __init__(
        self,
        rt: Runtime,
        *,
        max_restarts: int = 3,
        period_s: float = 10.0,
        on_escalate: EscalateCallback | None = None,
    ) -> None:
        self.rt = rt
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.on_escalate = on_escalate
        self.escalated = False
        self.restarts = 0  # total, for observability
        self._children: dict[str, tuple[SpawnSpec, ActorRef]] = {}
        self._crash_times: deque[float] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        rt.register_supervisor(self)

    @property
    def children(self) -> dict[str, ActorRef]:
        return {name: ref for name, (_spec, ref) in self._children.items()}

    async def start_child(
        self,
        factory: Callable[..., Actor] | str,
        *args: Any,
        name: str,
        host: Host = "loop",
        mailbox_size: int | None = None,
        **kwargs: Any,
    ) -> ActorRef:
        if self.escalated:
            raise RuntimeError("supervisor has escalated; it starts no more children")
        self._loop = asyncio.get_running_loop()
        ref = await self.rt.spawn(
            factory, *args, name=name, host=host, mailbox_size=mailbox_size, **kwargs
        )
        spec = SpawnSpec(factory, args, kwargs, name, host, mailbox_size)
        self._children[name] = (spec, ref)
        self._watch(self.rt.cell(name))
        return ref

    def _watch(self, entry: Entry) -> None:
        entry.add_exit_callback(self._on_exit, self._loop)

    def _on_exit(self, entry: Entry) -> None:
        if entry.state is not State.CRASHED or self.escalated or self.rt.closing:
            return
        if entry.name not in self._children:
            return
        task = self._loop.create_task(self._handle_crash(entry.name, entry.exit_error))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_crash(self, name: str, reason: BaseException | None) -> None:
        while not self.escalated and not self.rt.closing:
            now = time.monotonic()
            self._crash_times.append(now)
            while self._crash_times and self._crash_times[0] < now - self.period_s:
                self._crash_times.popleft()
            if len(self._crash_times) > self.max_restarts:
                await self._escalate(name, reason)
                return
            spec, ref = self._children[name]
            log.warning("restarting crashed actor", actor=name, reason=repr(reason))
            try:
                entry = await self.rt.start_incarnation(spec, ref)
            except Exception as exc:  # the restart itself crashed: counts as another crash
                reason = exc
                continue
            self.restarts += 1
            self._watch(entry)
            return

    async def _escalate(self, name: str, reason: BaseException | None) -> None:
        self.escalated = True
        error = RuntimeError(
            f"actor {name!r} crashed more than {self.max_restarts} times in {self.period_s:g} s"
            f" (last: {reason!r})"
        )
        log.error("supervisor escalates", actor=name, reason=repr(reason))
        await self.stop_children()
        if self.on_escalate is not None:
            result = self.on_escalate(error)
            if inspect.isawaitable(result):
                await result

    async def stop_children(self, timeout: float = 5.0) -> None:
        refs = [ref for _spec, ref in self._children.values()]
        await asyncio.gather(*(self.rt.stop(ref, timeout) for ref in refs))

    def forget_children(self) -> None:
        """The runtime has stopped: drop the children's spawn arguments, which may hold what
        they were built over (a shared model runner: weights, KV pool, graphs), so that
        nothing of them outlives the stop even while this supervisor is still referenced."""
        self._children.clear()

    def cancel_pending(self) -> None:
        """The runtime is shutting down: abandon restarts in progress."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
