"""The Actor base class and the `@handles` dispatch decorator.

An actor is one asyncio task with a bounded mailbox; it handles one message at a
time, in arrival order, dispatching on the message's type (the most specific
`@handles` class in the message type's MRO). A handler's return value is the
reply to an `ask` (ignored for a `tell`). Handlers may be `async def` or plain
`def` (plain ones skip a coroutine per message).

Failure rule:
- an `Exception` escaping a handler is the handler's failure, not the actor's:
  an asker gets `RemoteError(type_name, message)`, a tell is logged, and the
  actor goes on with the next message;
- `ActorCrash` (or any other BaseException except cancellation) escaping a
  handler, an exception in `on_start`, a crash of a task started with
  `spawn_task`, or a call to `self.crash(exc)` crashes the actor: `on_stop` runs,
  the ask being handled and every queued ask fail with `ActorCrashed`, and its
  supervisor (if any) restarts it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from greenroom.actors.errors import ActorCrash
from greenroom.logging import get_logger

if TYPE_CHECKING:
    from greenroom.actors.cell import ActorCell
    from greenroom.actors.ref import ActorRef
    from greenroom.actors.runtime import Runtime

_HANDLES_ATTR = "__greenroom_handles__"

Handler = tuple[Callable[..., Any], bool]  # (function, is_async)


def handles(*message_types: type) -> Callable[[Callable], Callable]:
    """Mark a method as the handler of the given message types."""
    if not message_types:
        raise TypeError("@handles needs at least one message type")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _HANDLES_ATTR, getattr(fn, _HANDLES_ATTR, ()) + message_types)
        return fn

    return mark


class Actor:
    """Subclass, add `@handles(MsgType)` methods, spawn with `Runtime.spawn`."""

    mailbox_size: ClassVar[int] = 256
    _handlers: ClassVar[dict[type, Handler]] = {}

    # Set by the runtime before on_start.
    name: str
    ref: ActorRef
    runtime: Runtime
    _cell: ActorCell

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[type, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for msg_type in getattr(attr, _HANDLES_ATTR, ()):
                    table[msg_type] = (attr, inspect.iscoroutinefunction(attr))
        cls._handlers = table

    @classmethod
    def handler_for(cls, msg_type: type) -> Handler | None:
        handlers = cls._handlers
        entry = handlers.get(msg_type)
        if entry is None:
            for base in msg_type.__mro__[1:]:
                entry = handlers.get(base)
                if entry is not None:
                    handlers[msg_type] = entry  # cache the MRO walk
                    break
        return entry

    async def on_start(self) -> None:
        """Runs before the first message; an exception here crashes the actor."""

    async def on_stop(self) -> None:
        """Runs once when the actor stops or crashes (no more messages follow)."""

    @property
    def log(self) -> Any:
        return get_logger(type(self).__module__).bind(actor=self.name)

    def crash(self, exc: BaseException | None = None) -> NoReturn | None:
        """Crash this actor. Inside a handler this raises; from anywhere else (another
        task or thread) it cancels the actor's task, which then ends as crashed."""
        reason = exc if exc is not None else ActorCrash(f"{self.name} crashed")
        if self._cell.is_current_task():
            raise ActorCrash(str(reason)) from reason
        self._cell.crash(reason)
        return None

    def take_reply(self) -> Any:
        """Inside a handler: take over the reply of the ask being handled (None for a
        tell), to answer it later with ``greenroom.actors.cell.settle(reply, value, error)``
        — e.g. once a result arrives from elsewhere, so the next message can be handled
        meanwhile. The handler's return value is then ignored, and the actor must settle
        every reply it took, on_stop included."""
        return self._cell.take_reply()

    def spawn_task(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        """A background task owned by this actor: cancelled when the actor stops; if it
        fails, the actor crashes."""
        return self._cell.spawn_task(coro, name)
