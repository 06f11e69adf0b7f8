"""Actors over ZeroMQ: a ROUTER that serves one actor, DEALER links that reach it.

Wire format (greenroom.bus.envelope): `[header, *codec frames]`. A served actor's
ROUTER lives on the actor's own loop, so incoming messages go straight into its
mailbox and replies leave from the same loop. When the mailbox is full the
server stops reading; the ZeroMQ queues then fill and the senders' high-water
marks push back (backpressure end to end).

A link keeps its pending asks in a dict of futures keyed by correlation id; a
reply resolves the future directly from the socket's reader callback.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING, Any

import zmq

from greenroom.actors.cell import ActorCell, settle
from greenroom.actors.errors import (
    ActorCrashed,
    ActorError,
    ActorStopped,
    AskTimeout,
    RemoteError,
)
from greenroom.actors.mailbox import call_on
from greenroom.bus.codec import CodecError, decode, encode
from greenroom.bus.envelope import ActorFailure, Kind, pack_header, unpack_header
from greenroom.bus.transport import Channel, Transport
from greenroom.logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

log = get_logger(__name__)

_TELL_HEADER = pack_header(Kind.TELL)


def failure_of(error: BaseException) -> ActorFailure:
    if isinstance(error, ActorCrashed):
        return ActorFailure(kind="crashed", message=str(error))
    if isinstance(error, ActorStopped):
        return ActorFailure(kind="stopped", message=str(error))
    if isinstance(error, RemoteError):
        return ActorFailure(kind="remote", error_type=error.type_name, message=error.message)
    if isinstance(error, CodecError):
        return ActorFailure(kind="codec", error_type="CodecError", message=str(error))
    return ActorFailure(kind="remote", error_type=type(error).__name__, message=str(error))


def error_of(failure: ActorFailure) -> ActorError:
    if failure.kind == "crashed":
        return ActorCrashed(failure.message)
    if failure.kind == "stopped":
        return ActorStopped(failure.message)
    return RemoteError(failure.error_type or failure.kind, failure.message)


class RemoteReply:
    """Where a served ask's outcome goes: back through the server's ROUTER."""

    __slots__ = ("server", "identity", "correlation_id")

    def __init__(self, server: ActorServer, identity: Any, correlation_id: int) -> None:
        self.server = server
        self.identity = identity
        self.correlation_id = correlation_id

    def settle(self, value: Any, error: BaseException | None) -> None:
        call_on(self.server.loop, self.server.reply, self, value, error)


class ActorServer:
    """Serves one local actor on a bound ROUTER address."""

    def __init__(self, cell: ActorCell, transport: Transport, address: str) -> None:
        self.cell = cell
        self.loop = transport.loop
        self.channel: Channel = transport.bind_router(address, self._on_frames)
        self.address = self.channel.address
        self._blocked: tuple[Any, Any] | None = None  # the item waiting for mailbox room

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            log.warning("dropped malformed frames", address=self.address, frames=len(frames))
            return
        identity = frames[0]
        try:
            kind, correlation_id = unpack_header(frames[1].buffer)
        except CodecError as exc:
            log.warning("dropped malformed frames", address=self.address, error=str(exc))
            return
        reply = RemoteReply(self, identity, correlation_id) if kind == Kind.ASK else None
        try:
            msg = decode(frames[2:])
        except CodecError as exc:
            log.warning("dropped undecodable message", address=self.address, error=str(exc))
            if reply is not None:
                self.reply(reply, None, exc)
            return
        self._deliver((msg, reply))

    def _deliver(self, item: tuple[Any, Any]) -> None:
        mailbox = self.cell.mailbox
        try:
            if mailbox.offer(item):
                return
        except ActorError as exc:
            if item[1] is not None:
                self.reply(item[1], None, exc)
            return
        self._blocked = item
        self.channel.pause_reading()
        mailbox.when_space(self.loop, self._on_space, None)

    def _on_space(self, _arg: Any) -> None:
        item, self._blocked = self._blocked, None
        if self.channel.closed or item is None:
            return
        self.channel.resume_reading()
        self._deliver(item)

    def reply(self, reply: RemoteReply, value: Any, error: BaseException | None) -> None:
        if self.channel.closed:
            return
        header = pack_header(Kind.REPLY, reply.correlation_id)
        try:
            payload = encode(value) if error is None else None
        except CodecError as exc:
            error = exc
        if error is not None:
            header = pack_header(Kind.FAILURE, reply.correlation_id)
            payload = encode(failure_of(error))
        frames = [reply.identity, header, *payload]
        if not self.channel.try_send(frames):
            self.loop.create_task(self._send_later(frames))

    async def _send_later(self, frames: list[Any]) -> None:
        try:
            await self.channel.send(frames)
        except ConnectionError:
            pass

    def close(self) -> None:
        blocked, self._blocked = self._blocked, None
        if blocked is not None and blocked[1] is not None:
            self.reply(blocked[1], None, ActorStopped("server closed"))
        self.channel.close()


class DealerLink:
    """This loop's connection to one served actor; pending asks by correlation id."""

    def __init__(self, transport: Transport, address: str) -> None:
        self.address = address
        self.loop = transport.loop
        self.channel = transport.connect_dealer(address, self._on_frames)
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)

    def try_tell(self, msg: Any) -> bool:
        return self.channel.try_send([_TELL_HEADER, *encode(msg)])

    async def tell(self, msg: Any) -> None:
        frames = [_TELL_HEADER, *encode(msg)]
        if not self.channel.try_send(frames):
            await self.channel.send(frames)

    async def ask(self, msg: Any, timeout: float) -> Any:
        correlation_id = next(self._ids)
        frames = [pack_header(Kind.ASK, correlation_id), *encode(msg)]
        fut = self.loop.create_future()
        self._pending[correlation_id] = fut
        handle = self.loop.call_later(timeout, self._expire, correlation_id, timeout)
        try:
            if not self.channel.try_send(frames):
                await asyncio.wait_for(self.channel.send(frames), timeout)
            return await fut
        except TimeoutError as exc:
            if isinstance(exc, AskTimeout):
                raise
            raise AskTimeout(f"no room to send within {timeout:g} s") from None
        finally:
            handle.cancel()
            self._pending.pop(correlation_id, None)

    def _expire(self, correlation_id: int, timeout: float) -> None:
        fut = self._pending.pop(correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(AskTimeout(f"no reply from {self.address} within {timeout:g} s"))

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        try:
            kind, correlation_id = unpack_header(frames[0].buffer)
        except CodecError as exc:
            log.warning("dropped malformed reply", address=self.address, error=str(exc))
            return
        fut = self._pending.pop(correlation_id, None)
        if fut is None or fut.done():
            return  # timed out or cancelled meanwhile
        try:
            value = decode(frames[1:])
        except CodecError as exc:
            fut.set_exception(RemoteError("CodecError", str(exc)))
            return
        if kind == Kind.FAILURE and isinstance(value, ActorFailure):
            fut.set_exception(error_of(value))
        else:
            fut.set_result(value)

    def fail_all(self, error: ActorError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            settle(fut, None, error)

    def close(self) -> None:
        self.fail_all(ActorStopped(f"link to {self.address} closed"))
        self.channel.close()


class LinkPool:
    """DealerLinks of one runtime, one per (event loop, address)."""

    def __init__(self, transport_for: Callable[[asyncio.AbstractEventLoop], Transport]):
        self._transport_for = transport_for
        self._links: dict[tuple[asyncio.AbstractEventLoop, str], DealerLink] = {}

    def link(self, address: str) -> DealerLink:
        loop = asyncio.get_running_loop()
        link = self._links.get((loop, address))
        if link is None or link.channel.closed:
            link = DealerLink(self._transport_for(loop), address)
            self._links[(loop, address)] = link
        return link

    def fail(self, address: str, error: ActorError) -> None:
        """Fail the pending asks towards address on every loop (thread-safe)."""
        for (loop, addr), link in list(self._links.items()):
            if addr == address:
                call_on(loop, link.fail_all, error)

    def close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this loop's links (call on that loop)."""
        for key in [k for k in self._links if k[0] is loop]:
            self._links.pop(key).close()

    def discard(self, address: str) -> None:
        """Close links to an address that is gone (thread-safe)."""
        for key in [k for k in self._links if k[1] == address]:
            link = self._links.pop(key, None)
            if link is not None:
                call_on(key[0], link.close)
