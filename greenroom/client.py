"""Client library: async and sync clients for a greenroom node's frontend.

Wire protocol (ZeroMQ DEALER -> the frontend's ROUTER): each request frame is one msgpack
`GenerateRequest | AbortRequest | ServerInfoQuery` (maps with named fields); each reply frame is
a msgpack array of `TokenDelta | RequestError | ServerInfo`, batched per iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from greenroom.bus.messages import (
    AbortRequest,
    ClientReply,
    GenerateRequest,
    NodeStats,
    NodeStatsQuery,
    RequestError,
    RequestMetrics,
    SamplingParams,
    ServerInfo,
    ServerInfoQuery,
    TokenDelta,
    TokenLogprobs,
)


class GreenroomError(Exception):
    """A request ended with an error; `kind` says which."""

    kind = "failed"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestRejected(GreenroomError):
    kind = "invalid"


class Overloaded(GreenroomError):
    kind = "overloaded"


class RequestTimeout(GreenroomError):
    kind = "timeout"


class RequestFailed(GreenroomError):
    kind = "failed"


class RequestAborted(GreenroomError):
    kind = "aborted"


_ERRORS: dict[str, type[GreenroomError]] = {
    cls.kind: cls
    for cls in (RequestRejected, Overloaded, RequestTimeout, RequestFailed, RequestAborted)
}


def error_from(msg: RequestError) -> GreenroomError:
    return _ERRORS.get(msg.kind, RequestFailed)(msg.message, msg.request_id)


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: RequestMetrics | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str | None = None
    index: int = 0  # which sample of an n > 1 request


_reply_decoder = msgspec.msgpack.Decoder(list[ClientReply])
_encoder = msgspec.msgpack.Encoder()


class AsyncClient:
    """Talks to one node's frontend. Use as `async with AsyncClient(addr) as c:`."""

    def __init__(
        self, address: str, *, timeout: float = 600.0, context: zmq.asyncio.Context | None = None
    ):
        self.address = address
        self.timeout = timeout
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(self.address)
        self._sock = sock
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        """Close the connection; the server aborts this client's unfinished requests."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._sock is not None:
            self._sock.close(linger=0)
        for q in self._queues.values():
            q.put_nowait(RequestError(request_id="", kind="failed", message="client closed"))

    async def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            frame = await self._sock.recv()
            try:
                replies = _reply_decoder.decode(frame)
            except msgspec.DecodeError:
                continue  # a malformed reply must not kill the client
            for reply in replies:
                q = self._queues.get(reply.request_id)
                if q is not None:
                    q.put_nowait(reply)

    async def _send(self, msg) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        await self._sock.send(_encoder.encode(msg))

    # ------------------------------------------------------------------ raw protocol

    def open_replies(self, request_id: str) -> asyncio.Queue:
        """A queue that receives every reply for ``request_id`` (for a router or a test
        driving the protocol's other messages: PrefillRequest, DecodeRequest, ReleaseKV)."""
        if request_id in self._queues:
            raise RequestRejected(f"request id {request_id!r} is already in use by this client")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def close_replies(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def fail_all(self, message: str) -> None:
        """Every open queue gets a ``failed`` error (the peer is known to be gone)."""
        for rid, q in self._queues.items():
            q.put_nowait(RequestError(request_id=rid, kind="failed", message=message))

    async def send(self, msg) -> None:
        await self._send(msg)

    async def server_info(self) -> ServerInfo:
        qid = f"info-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[qid] = q
        try:
            await self._send(ServerInfoQuery(request_id=qid))
            wait_s = min(self.timeout, 30.0)
            reply = await asyncio.wait_for(q.get(), timeout=wait_s)
        except TimeoutError:
            raise RequestTimeout(f"no answer from {self.address} within {wait_s:g} s") from None
        finally:
            self._queues.pop(qid, None)
        if isinstance(reply, RequestError):
            raise error_from(reply)
        return reply

    async def node_stats(self, timeout: float = 30.0) -> NodeStats:
        """Running/waiting requests, KV use and cumulative token and prefix-cache counters;
        the answer comes from the scheduler and the KV manager, so it proves both alive."""
        qid = f"stats-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[qid] = q
        try:
            await self._send(NodeStatsQuery(request_id=qid))
            reply = await asyncio.wait_for(q.get(), timeout=timeout)
        except TimeoutError:
            raise RequestTimeout(f"no answer from {self.address} within {timeout:g} s") from None
        finally:
            self._queues.pop(qid, None)
        if isinstance(reply, RequestError):
            raise error_from(reply)
        return reply

    async def stream(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        *,
        prompt: str | None = None,
        request_id: str | None = None,
        priority: int = 35,
        cache_salt: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Yield token deltas as they are produced; the last one has `finish_reason` set.

        With `sampling.n > 1` the deltas of the n samples interleave, each naming its sample
        in `delta.index`; each sample's last delta has `finish_reason` set and the stream
        ends after the last sample's. Leaving the loop early (break, cancellation) aborts the
        request on the server.
        """
        rid = request_id or uuid.uuid4().hex
        if rid in self._queues:
            raise RequestRejected(f"request id {rid!r} is already in use by this client", rid)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        finished = False
        running = (sampling or SamplingParams()).n  # samples not finished yet
        try:
            await self._send(
                GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=prompt_token_ids,
                    prompt=prompt,
                    sampling=sampling or SamplingParams(),
                    priority=priority,
                    cache_salt=cache_salt,
                )
            )
            while True:
                if q.empty():  # no task per delta: a deadline on the await itself
                    try:
                        async with asyncio.timeout(self.timeout):
                            reply = await q.get()
                    except TimeoutError:
                        raise RequestTimeout(
                            f"request {rid} produced nothing for {self.timeout:.0f} s", rid
                        ) from None
                else:
                    reply = q.get_nowait()
                if isinstance(reply, RequestError):
                    finished = True
                    raise error_from(reply)
                if reply.finish_reason is not None:
                    running -= 1
                    finished = running <= 0
                yield reply
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and not self._closed:
                with contextlib.suppress(Exception):
                    await self._send(AbortRequest(request_id=rid))

    async def generate(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        **kw,
    ) -> GenerationResult | list[GenerationResult]:
        """Run one request to completion and return all of it: one result, or with
        `sampling.n > 1` a list of n results in sample order."""
        n = (sampling or SamplingParams()).n
        results: list[GenerationResult] = []
        texts: list[list[str]] = []
        for i in range(n):
            results.append(GenerationResult("", [], None, None, index=i))
            texts.append([])
        async for delta in self.stream(prompt_token_ids, sampling, **kw):
            r = results[delta.index]
            r.request_id = delta.request_id
            r.token_ids.extend(delta.token_ids)
            if delta.logprobs:
                r.logprobs.extend(delta.logprobs)
            if delta.text:
                texts[delta.index].append(delta.text)
            if delta.finish_reason is not None:
                r.finish_reason, r.metrics = delta.finish_reason, delta.metrics
        for r, parts in zip(results, texts, strict=True):
            r.text = "".join(parts) if parts else None
        return results if n > 1 else results[0]

    async def abort(self, request_id: str) -> None:
        await self._send(AbortRequest(request_id=request_id))


class Client:
    """Blocking client: runs an AsyncClient on a private event loop thread."""

    def __init__(self, address: str, *, timeout: float = 600.0):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="greenroom-client", daemon=True
        )
        self._thread.start()
        self._ctx = zmq.asyncio.Context()
        self._async = AsyncClient(address, timeout=timeout, context=self._ctx)
        self._call(self._connect())

    async def _connect(self) -> None:
        self._async.connect()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def server_info(self) -> ServerInfo:
        return self._call(self._async.server_info())

    def generate(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        **kw,
    ) -> GenerationResult | list[GenerationResult]:
        return self._call(self._async.generate(prompt_token_ids, sampling, **kw))

    def stream(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        **kw,
    ) -> Iterator[TokenDelta]:
        agen = self._async.stream(prompt_token_ids, sampling, **kw)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def abort(self, request_id: str) -> None:
        self._call(self._async.abort(request_id))

    def close(self) -> None:
        if not self._loop.is_running():
            return
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        self._ctx.term()
