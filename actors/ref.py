"""ActorRef: the handle callers hold; it stays valid across restarts.

A ref points at a target: `LocalTarget` for an actor of this process (any
loop or thread: the mailbox is thread-safe), or `RemoteTarget` for an actor
behind a ZeroMQ address (another process or node). A supervisor rebinds the
ref to each new incarnation.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from greenroom.actors.cell import ActorCell
from greenroom.actors.errors import ActorError, AskTimeout, MailboxFull

if TYPE_CHECKING:
    from greenroom.actors.remote import LinkPool


class Target(Protocol):
    async def tell(self, msg: Any) -> None: ...
    def tell_nowait(self, msg: Any) -> None: ...
    async def ask(self, msg: Any, timeout: float) -> Any: ...


def _expire(fut: asyncio.Future, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(AskTimeout(f"no reply within {timeout:g} s"))


class LocalTarget:
    """An actor hosted in this process."""

    __slots__ = ("cell",)

    def __init__(self, cell: ActorCell) -> None:
        self.cell = cell

    async def tell(self, msg: Any) -> None:
        mailbox = self.cell.mailbox
        if not mailbox.offer((msg, None)):
            await mailbox.put((msg, None))

    def tell_nowait(self, msg: Any) -> None:
        self.cell.mailbox.put_nowait((msg, None))

    async def ask(self, msg: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        handle = loop.call_later(timeout, _expire, fut, timeout)
        try:
            mailbox = self.cell.mailbox
            if not mailbox.offer((msg, fut)):
                put = loop.create_task(mailbox.put((msg, fut)))
                await asyncio.wait([put, fut], return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
                elif put.exception() is not None:
                    raise put.exception()
            return await fut
        finally:
            handle.cancel()


class RemoteTarget:
    """An actor served on a ZeroMQ address; one DEALER per (event loop, address)."""

    __slots__ = ("address", "pool", "dead")

    def __init__(self, address: str, pool: LinkPool) -> None:
        self.address = address
        self.pool = pool
        self.dead: ActorError | None = None  # set when its process is known to be gone

    def _link(self):
        if self.dead is not None:
            raise self.dead
        return self.pool.link(self.address)

    async def tell(self, msg: Any) -> None:
        await self._link().tell(msg)

    def tell_nowait(self, msg: Any) -> None:
        if not self._link().try_tell(msg):
            raise MailboxFull(f"high-water mark reached towards {self.address}")

    async def ask(self, msg: Any, timeout: float) -> Any:
        return await self._link().ask(msg, timeout)


class ActorRef:
    """Send messages to an actor: `tell` (fire-and-forget) or `ask` (awaits the reply)."""

    __slots__ = ("name", "_target")

    def __init__(self, name: str, target: Target) -> None:
        self.name = name
        self._target = target

    def __repr__(self) -> str:
        return f"ActorRef({self.name!r})"

    async def tell(self, msg: Any) -> None:
        """Queue msg; waits while the mailbox (or the socket) is full."""
        await self._target.tell(msg)

    def tell_nowait(self, msg: Any) -> None:
        """Queue msg now or raise MailboxFull."""
        self._target.tell_nowait(msg)

    async def ask(self, msg: Any, *, timeout: float) -> Any:
        """Send msg and await the handler's return value.

        Raises AskTimeout, ActorStopped, ActorCrashed, or RemoteError (the handler raised)."""
        return await self._target.ask(msg, timeout)
