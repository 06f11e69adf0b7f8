"""One incarnation of an actor in this process: its mailbox, its task, its exit.

Mailbox items are `(message, reply)`; reply is None for a tell, an asyncio Future
of the asker's loop for a local ask, or a `Reply` (anything with `settle`) for
an ask that came over the wire. Replies are settled on the asker's loop.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from greenroom.actors.errors import (
    ActorCrashed,
    ActorError,
    ActorStopped,
    RemoteError,
)
from greenroom.actors.mailbox import CLOSED, EMPTY, Mailbox, call_on
from greenroom.logging import bind_request_ids, get_logger, unbind_request_ids

if TYPE_CHECKING:
    from greenroom.actors.actor import Actor

log = get_logger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    CRASHED = "crashed"


class Reply(Protocol):
    def settle(self, value: Any, error: BaseException | None) -> None: ...


def _set_future(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)


def settle(reply: Any, value: Any, error: BaseException | None = None) -> None:
    """Deliver an ask's outcome to wherever the asker waits."""
    if isinstance(reply, asyncio.Future):
        call_on(reply.get_loop(), _set_future, reply, value, error)
    else:
        reply.settle(value, error)


ExitCallback = Callable[["ActorCell"], None]


class ActorCell:
    """Runs one actor instance on `loop`; thread-safe to put into and to stop."""

    def __init__(self, actor: Actor, name: str, loop: asyncio.AbstractEventLoop, mailbox_size: int):
        self.actor = actor
        self.name = name
        self.loop = loop
        self.mailbox = Mailbox(mailbox_size, loop)
        self.state = State.STARTING
        self.exit_error: BaseException | None = None  # why it crashed
        self._task: asyncio.Task | None = None
        self._crash_reason: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._exit_callbacks: list[tuple[asyncio.AbstractEventLoop, ExitCallback]] = []
        actor.name = name
        actor._cell = self

    @property
    def alive(self) -> bool:
        return self.state in (State.STARTING, State.RUNNING)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the task on the current loop; returns after on_start (raises if it failed)."""
        started = self.loop.create_future()
        self._task = self.loop.create_task(self._main(started), name=f"actor:{self.name}")
        await started

    def is_current_task(self) -> bool:
        return self._task is not None and asyncio.current_task() is self._task

    def request_stop(self) -> None:
        """Stop after the message being handled; queued asks get ActorStopped. Thread-safe."""
        self._fail_queued(self.mailbox.close(ActorStopped(f"actor {self.name!r} stopped")))

    def crash(self, reason: BaseException) -> None:
        """Crash the actor from outside its task (thread-safe)."""
        call_on(self.loop, self._crash, reason)

    def _crash(self, reason: BaseException) -> None:
        if self._crash_reason is None:
            self._crash_reason = reason
        self._cancel()

    def kill(self) -> None:
        """Cancel the task now (a stop that does not wait for the handler). Thread-safe."""
        call_on(self.loop, self._cancel)

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def add_exit_callback(self, fn: ExitCallback, loop: asyncio.AbstractEventLoop) -> None:
        """fn(cell) runs on loop when the actor has stopped or crashed (at once if it has)."""
        if self.alive:
            self._exit_callbacks.append((loop, fn))
        else:
            call_on(loop, fn, self)

    async def wait_exit(self) -> None:
        if not self.alive:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.add_exit_callback(lambda _cell: done.done() or done.set_result(None), loop)
        await done

    def take_reply(self) -> Any:
        reply, self._current_reply = self._current_reply, None
        return reply

    def spawn_task(self, coro: Coroutine[Any, Any, Any], name: str | None) -> asyncio.Task:
        task = self.loop.create_task(coro, name=name or f"{self.name}:task")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.alive:
            self.crash(task.exception())

    # ------------------------------------------------------------------ the task

    async def _main(self, started: asyncio.Future) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        try:
            await self.actor.on_start()
        except BaseException as exc:  # noqa: B036 - a failed start is a crash, whatever it is
            await self._finish(exc, None, run_on_stop=False)
            started.set_exception(ActorCrashed(f"actor {self.name!r} failed to start: {exc!r}"))
            return
        self.state = State.RUNNING
        started.set_result(None)
        try:
            await self._serve()
        except asyncio.CancelledError:
            await self._finish(self._crash_reason, self._current_reply)
        except BaseException as exc:  # noqa: B036 - see the failure rule in actor.py
            await self._finish(exc, self._current_reply)
        else:
            await self._finish(None, None)

    _current_reply: Any = None

    async def _serve(self) -> None:
        actor = self.actor
        cls = type(actor)
        mailbox = self.mailbox
        while True:
            item = mailbox.get_nowait()
            if item is EMPTY:
                item = await mailbox.get()
            if item is CLOSED:
                return
            msg, reply = item
            self._current_reply = reply
            entry = cls.handler_for(type(msg))
            tokens = bind_request_ids(msg)
            try:
                if entry is None:
                    raise TypeError(f"{cls.__name__} has no handler for {type(msg).__name__}")
                fn, is_async = entry
                result = fn(actor, msg)
                if is_async:
                    result = await result
            except Exception as exc:
                if self._current_reply is not None:
                    settle(reply, None, RemoteError(type(exc).__name__, str(exc)))
                else:
                    log.exception("handler failed", message=type(msg).__name__)
            else:
                if self._current_reply is not None:
                    settle(reply, result)
            finally:
                if tokens is not None:
                    unbind_request_ids(tokens)
            self._current_reply = None

    async def _finish(self, error: BaseException | None, reply: Any, run_on_stop: bool = True):
        """Fail what is pending, run on_stop, then report the exit."""
        crashed = error is not None
        if crashed:
            fail: ActorError = ActorCrashed(f"actor {self.name!r} crashed: {error!r}")
            log.error("actor crashed", error=repr(error))
        else:
            fail = ActorStopped(f"actor {self.name!r} stopped")
        self._fail_queued(self.mailbox.close(fail))
        if reply is not None:
            settle(reply, None, fail)
        self._current_reply = None
        self.exit_error = error
        for task in list(self._tasks):
            task.cancel()
        if run_on_stop:
            try:
                await self.actor.on_stop()
            except Exception:
                log.exception("on_stop failed")
            except asyncio.CancelledError:
                log.warning("on_stop cancelled")
        self.state = State.CRASHED if crashed else State.STOPPED
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for loop, fn in callbacks:
            call_on(loop, fn, self)

    def _fail_queued(self, items: list[Any]) -> None:
        error = self.mailbox._closed_error
        for _msg, reply in items:
            if reply is not None:
                settle(reply, None, error)
