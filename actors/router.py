"""Router actor: the client-facing endpoint of disaggregated serving.

It speaks the frontend's client protocol (it *is* a Frontend: same validation, streaming and
abort-on-disconnect), but where a node's frontend hands a request to its scheduler, the router
runs it across nodes: a PrefillRequest to the least-loaded context node (its first token goes to
the client at once), then a DecodeRequest with the context node's transfer handle to the
least-loaded generation node (the rest of the tokens), and the generation node's TransferDone
back to the context node as its ReleaseKV. Only handles and acknowledgements pass through here;
the KV bytes go from node to node through NIXL.

The context node's blocks are released only once the generation node says its read settled,
or by the lease's own deadline, never while a read may still be running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from greenroom.actors.frontend import Frontend, FrontendLimits
from greenroom.bus.messages import (
    AbortRequest,
    CancelRequests,
    DecodeRequest,
    OutputBatch,
    PrefillRequest,
    ReleaseKV,
    RequestError,
    ServerInfo,
    SubmitRequest,
    TokenDelta,
    TransferDone,
    TransferHandle,
)
from greenroom.bus.security import SocketSecurity
from greenroom.client import AsyncClient
from greenroom.logging import get_logger

log = get_logger(__name__)

_ABORT = object()
_TIMEOUT = object()


@dataclass
class NodeLink:
    """The router's connection to one context or generation node."""

    address: str
    role: str
    client: AsyncClient
    info: ServerInfo | None = None
    load: int = 0  # router requests on this node now
    alive: bool = True


@dataclass
class _Flow:
    sub: SubmitRequest
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def request_id(self) -> str:
        return self.sub.request_id


class _Dispatch:
    """Stands where a node's frontend holds its scheduler: submits and cancels go to flows."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def tell_nowait(self, msg) -> None:
        self.router.dispatch(msg)

    async def tell(self, msg) -> None:
        self.router.dispatch(msg)


def pick_least_loaded(links: list[NodeLink]) -> NodeLink | None:
    live = [link for link in links if link.alive]
    return min(live, key=lambda link: link.load) if live else None


class Router(Frontend):
    mailbox_size = 4096

    def __init__(
        self,
        address: str,
        limits: FrontendLimits,
        info: ServerInfo,
        context: list[NodeLink],
        generation: list[NodeLink],
        node_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        tokenizer=None,
        security: SocketSecurity | None = None,
        insecure: bool = False,
    ) -> None:
        super().__init__(address, limits, info, tokenizer, security=security, insecure=insecure)
        self.context = context
        self.generation = generation
        self.node_timeout_s = node_timeout_s
        self.request_timeout_s = request_timeout_s
        self._flows: dict[str, _Flow] = {}
        self.scheduler = _Dispatch(self)

    async def on_start(self) -> None:
        await super().on_start()
        self.spawn_task(self._heartbeats(), name="node-heartbeats")

    async def on_stop(self) -> None:
        for f in list(self._flows.values()):
            if f.task is not None:
                f.task.cancel()
        await super().on_stop()

    # ------------------------------------------------------------------ requests

    def dispatch(self, msg) -> None:
        if isinstance(msg, SubmitRequest):
            flow = _Flow(msg)
            self._flows[msg.request_id] = flow
            flow.task = asyncio.get_running_loop().create_task(self._serve(flow))
        elif isinstance(msg, CancelRequests):
            for rid in msg.request_ids:
                flow = self._flows.get(rid)
                if flow is not None:
                    flow.aborted.set()

    async def _emit(self, **batch) -> None:
        await self.ref.tell(OutputBatch(**batch))

    async def _fail(self, rid: str, kind: str, message: str) -> None:
        await self._emit(errors=[RequestError(request_id=rid, kind=kind, message=message)])

    async def _serve(self, f: _Flow) -> None:
        rid = f.request_id
        try:
            ctx = pick_least_loaded(self.context)
            if ctx is None:
                await self._fail(rid, "overloaded", "no context node is answering; retry later")
                return
            handle = await self._prefill(f, ctx)
            if handle is not None:
                await self._decode(f, ctx, handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("router request failed", request_id=rid, error=repr(exc))
            await self._fail(rid, "failed", f"router: {exc}")
        finally:
            self._flows.pop(rid, None)

    def _fields(self, f: _Flow) -> dict:
        s = f.sub
        return {
            "request_id": s.request_id,
            "prompt_token_ids": s.prompt_token_ids,
            "sampling": s.sampling,
            "priority": s.priority,
            "cache_salt": s.cache_salt,
        }

    async def _next(self, q: asyncio.Queue, f: _Flow, watch_abort: bool, timeout: float | None):
        """The next reply, ``_ABORT`` once the client aborted, or ``_TIMEOUT``."""
        if not q.empty():
            return q.get_nowait()
        getter = asyncio.ensure_future(q.get())
        waits = {getter}
        aborter = None
        if watch_abort:
            aborter = asyncio.ensure_future(f.aborted.wait())
            waits.add(aborter)
        try:
            done, _ = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in waits:
                if not t.done():
                    t.cancel()
        if getter in done:
            return getter.result()
        if aborter is not None and aborter in done:
            return _ABORT
        return _TIMEOUT

    async def _prefill(self, f: _Flow, ctx: NodeLink) -> TransferHandle | None:
        """Context phase: the first token streams to the client; returns the handle, or
        None when the request ended here (finished at its first token, error, abort)."""
        rid = f.request_id
        q = ctx.client.open_replies(rid)
        ctx.load += 1
        try:
            await ctx.client.send(PrefillRequest(**self._fields(f)))
            abort_sent = False
            while True:
                item = await self._next(q, f, not abort_sent, self.request_timeout_s)
                if item is _ABORT:
                    abort_sent = True
                    await ctx.client.send(AbortRequest(request_id=rid))
                    continue
                if item is _TIMEOUT:
                    await ctx.client.send(AbortRequest(request_id=rid))
                    await self._fail(rid, "timeout", "the context node did not answer in time")
                    return None
                if isinstance(item, TransferHandle):
                    if abort_sent or f.aborted.is_set():
                        await self._ack(ctx, rid, "cancelled")
                        await self._emit(deltas=[_abort_delta(rid)])
                        return None
                    return item
                if isinstance(item, TokenDelta):
                    await self._emit(deltas=[item])
                    if item.finish_reason is not None:
                        return None
                    continue
                if isinstance(item, RequestError):
                    await self._emit(errors=[item])
                    return None
        finally:
            ctx.client.close_replies(rid)
            ctx.load -= 1

    async def _decode(self, f: _Flow, ctx: NodeLink, handle: TransferHandle) -> None:
        """Generation phase: stream the rest; acknowledge the context node when the read
        settled (wait for that past the last token, up to the lease's deadline)."""
        rid = f.request_id
        gen = pick_least_loaded(self.generation)
        if gen is None:
            await self._ack(ctx, rid, "cancelled")
            await self._fail(rid, "overloaded", "no generation node is answering; retry later")
            return
        q = gen.client.open_replies(rid)
        gen.load += 1
        try:
            await gen.client.send(DecodeRequest(**self._fields(f), handle=handle))
            abort_sent = acked = final = False
            while not (final and acked):
                timeout = self.request_timeout_s
                if final:  # only the acknowledgement is missing: it comes before the lease ends
                    timeout = max(0.0, handle.lease_deadline - time.time())
                item = await self._next(q, f, not (abort_sent or final), timeout)
                if item is _ABORT:
                    abort_sent = True
                    await gen.client.send(AbortRequest(request_id=rid))
                    continue
                if item is _TIMEOUT:
                    if not final:
                        await gen.client.send(AbortRequest(request_id=rid))
                        await self._fail(
                            rid, "timeout", "the generation node did not answer in time"
                        )
                    return  # unacknowledged: the context node's lease runs out on its own
                if isinstance(item, TransferDone):
                    await self._ack(ctx, rid, item.state)
                    acked = True
                    continue
                if isinstance(item, TokenDelta):
                    if not final:
                        await self._emit(deltas=[item])
                    final = final or item.finish_reason is not None
                    continue
                if isinstance(item, RequestError):
                    if not final:
                        await self._emit(errors=[item])
                    final = True
                    if not gen.alive:
                        return  # it will never acknowledge: the lease runs out on its own
        finally:
            gen.client.close_replies(rid)
            gen.load -= 1

    async def _ack(self, ctx: NodeLink, rid: str, outcome: str) -> None:
        """Release the context node's lease; if the node is gone, its lease dies with it."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                ctx.client.send(ReleaseKV(request_id=rid, outcome=outcome)), self.node_timeout_s
            )

    # ------------------------------------------------------------------ node liveness

    async def _heartbeats(self) -> None:
        """A node silent for ``node_timeout_s`` is dead: its requests fail now, not at a
        request timeout, and no new request goes to it until it answers again."""
        period = min(1.0, self.node_timeout_s / 4)
        links = self.context + self.generation
        while True:
            await asyncio.gather(*(self._ping(link) for link in links))
            await asyncio.sleep(period)

    async def _ping(self, link: NodeLink) -> None:
        try:
            await asyncio.wait_for(link.client.server_info(), self.node_timeout_s)
        except (TimeoutError, Exception) as exc:
            if link.alive:
                log.warning(
                    "node not answering", address=link.address, role=link.role, error=repr(exc)
                )
                link.alive = False
                link.client.fail_all(f"the {link.role} node at {link.address} is not answering")
            return
        if not link.alive:
            log.info("node back", address=link.address, role=link.role)
            link.alive = True

    def stats_by_node(self) -> dict[str, dict]:
        return {
            link.address: {"role": link.role, "load": link.load, "alive": link.alive}
            for link in self.context + self.generation
        }


def _abort_delta(rid: str) -> TokenDelta:
    return TokenDelta(request_id=rid, token_ids=[], finish_reason="abort")


async def close_links(links: list[NodeLink]) -> None:
    for link in links:
        with contextlib.suppress(Exception):
            await link.client.close()


__all__ = ["NodeLink", "Router", "close_links", "pick_least_loaded"]
