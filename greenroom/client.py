"""Client library: async and sync clients for a greenroom node's frontend.

Wire protocol (ZeroMQ DEALER -> the frontend's ROUTER): each request frame is one msgpack
`GenerateRequest | AbortRequest | ServerInfoQuery` (maps with named fields); each reply frame is
a msgpack array of `TokenDelta | RequestError | ServerInfo`, batched per iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio
import zmq.utils.monitor

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
    """The request is invalid (the message says which field and why); nothing ran."""

    kind = "invalid"


class MalformedRequest(RequestRejected):
    """The server could not read a frame at all (not msgpack, no request id)."""

    kind = "malformed"


class Overloaded(GreenroomError):
    """The server refused new work for now; retry later."""

    kind = "overloaded"


class RequestTimeout(GreenroomError):
    """The request ran past its deadline (the server's `request_timeout_s`, or the client's)."""

    kind = "timeout"


class RequestFailed(GreenroomError):
    """The server failed the request (engine crash, shutdown, a step that failed)."""

    kind = "failed"


class RequestAborted(GreenroomError):
    kind = "aborted"


class ServerUnavailable(GreenroomError):
    """No server answers: none at the address, it died, or it refused this client's key."""

    kind = "unavailable"


_ERRORS: dict[str, type[GreenroomError]] = {
    cls.kind: cls
    for cls in (
        RequestRejected,
        MalformedRequest,
        Overloaded,
        RequestTimeout,
        RequestFailed,
        RequestAborted,
        ServerUnavailable,
    )
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

CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 1.0
_MONITORED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_MONITOR_STOPPED
)
if TYPE_CHECKING:
    from greenroom.bus.security import ClientKeys

_MONITOR_IDS = itertools.count()


class AsyncClient:
    """Talks to one node's frontend. Use as `async with AsyncClient(addr) as c:`.

    Entering (or the first request) performs a handshake that fails with `ServerUnavailable`
    within `connect_timeout` if no server answers. ZeroMQ heartbeats then watch the
    connection: when it drops (the server died or stopped answering for 3 heartbeats), every
    open stream fails with `ServerUnavailable` within seconds.

    With CURVE (a server bound beyond loopback): `server_key` is the server's public key file
    (`NAME.key`) and `client_key` this client's secret key file (`NAME.key_secret`), both made
    by `greenroom keys` (or `keys`, the same already loaded).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 600.0,
        context: zmq.asyncio.Context | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        heartbeat_s: float = HEARTBEAT_S,
        server_key: str | None = None,
        client_key: str | None = None,
        keys: ClientKeys | None = None,
    ):
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both server_key and client_key (or neither)")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.heartbeat_s = heartbeat_s
        self._keys = None
        if keys is not None:  # already loaded (a router towards its nodes)
            self._keys = (keys.server_public_key, keys.public_key, keys.secret_key)
        elif server_key is not None:
            from greenroom.bus.security import load_key_pair, load_public_key

            self._keys = (load_public_key(server_key), *load_key_pair(client_key))
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._queues: dict[str, asyncio.Queue] = {}  # by wire id
        self._wire: dict[str, str] = {}  # open stream's request id -> its wire id
        self._abandoned: set[str] = set()  # ids of streams left early (messages may trail)
        self._reader: asyncio.Task | None = None
        self._monitor: asyncio.Task | None = None
        self._up = asyncio.Event()
        self._refused: str | None = None  # why the handshake was refused (authentication)
        self._info: ServerInfo | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def info(self) -> ServerInfo | None:
        """What the handshake learned (None before it)."""
        return self._info

    def connect(self) -> None:
        """Open the socket (no handshake; `start` or the first request does that)."""
        if self._sock is not None:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.heartbeat_s > 0:
            ms = max(1, int(self.heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_IVL, ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ms)
        if self._keys is not None:
            from greenroom.bus.security import apply_client_keys

            apply_client_keys(sock, *self._keys)
        # pyzmq names the monitor endpoint after the socket's file descriptor: a client that
        # was dropped without close() keeps it bound, and a new socket reusing that descriptor
        # would collide ("Address already in use"), so each monitor gets a name of its own
        monitor = sock.get_monitor_socket(
            _MONITORED, addr=f"inproc://greenroom-client-monitor-{next(_MONITOR_IDS)}"
        )
        sock.connect(self.address)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop())
        self._monitor = loop.create_task(self._watch(monitor))

    async def start(self) -> ServerInfo:
        """Connect and handshake: `ServerUnavailable` if no server answers in time."""
        if self._info is None:
            self.connect()
            self._info = await self._query_info(self.connect_timeout)
        return self._info

    async def close(self) -> None:
        """Close the connection; the server aborts this client's unfinished requests."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:  # while the monitor's reader is open: it never blocks
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
        for task in (self._reader, self._monitor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._sock is not None:
            self._sock.close(linger=0)
        self._fail_all(RequestFailed("client closed"))

    def _fail_all(self, error: GreenroomError) -> None:
        for q in self._queues.values():
            q.put_nowait(error)

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

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Follow the connection: up after a handshake, and every open stream fails when
        it drops."""
        try:
            while True:
                event = zmq.utils.monitor.parse_monitor_message(await monitor.recv_multipart())
                kind = event["event"]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._refused = None
                    self._up.set()
                elif kind == zmq.EVENT_DISCONNECTED:
                    was_up = self._up.is_set()
                    self._up.clear()
                    if was_up:
                        self._fail_all(
                            ServerUnavailable(
                                f"lost the connection to the server at {self.address}"
                            )
                        )
                elif kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                else:
                    self._refused = (
                        f"the server at {self.address} refused the handshake "
                        "(CURVE keys missing or not authorized)"
                    )
                    self._fail_all(ServerUnavailable(self._refused))
        finally:
            # the monitor stops before its reader closes: a socket that closed later under
            # a monitor with no reader would block a ZeroMQ thread of the shared context
            # sending it the close event (every other socket of the process then stalls)
            if self._sock is not None and not self._sock.closed:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.disable_monitor()
            monitor.close(linger=0)

    async def _wait_up(self, timeout: float) -> None:
        if self._up.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            why = (
                self._refused
                or f"no greenroom server answered at {self.address} within {timeout:g} s"
            )
            raise ServerUnavailable(why) from None

    async def _send(self, msg) -> None:
        try:
            payload = _encoder.encode(msg)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as exc:
            rid = getattr(msg, "request_id", None)
            raise RequestRejected(f"the request cannot be encoded: {exc}", rid) from None
        limit = self._info.max_message_bytes if self._info is not None else 0
        if limit and len(payload) > limit:
            raise RequestRejected(
                f"the request is {len(payload)} bytes; the server takes at most {limit}",
                getattr(msg, "request_id", None),
            )
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        await self._wait_up(self.connect_timeout)
        await self._sock.send(payload)

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

    async def _query_info(self, deadline: float) -> ServerInfo:
        qid = f"info-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[qid] = q
        try:
            async with asyncio.timeout(deadline):
                await self._send(ServerInfoQuery(request_id=qid))
                reply = await q.get()
        except TimeoutError:
            raise ServerUnavailable(
                self._refused
                or f"no greenroom server answered at {self.address} within {deadline:g} s"
            ) from None
        finally:
            self._queues.pop(qid, None)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, RequestError):
            raise error_from(reply)
        return reply

    async def server_info(self) -> ServerInfo:
        await self.start()
        return await self._query_info(min(self.timeout, 30.0))

    async def node_stats(self, timeout: float = 30.0) -> NodeStats:
        """Running/waiting requests, KV use and cumulative token and prefix-cache counters;
        the answer comes from the scheduler and the KV manager, so it proves both alive."""
        await self.start()
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
        if isinstance(reply, BaseException):
            raise reply
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
        ends after the last sample's. Leaving the loop early (break, cancellation) aborts
        the request on the server; leaving it on the final delta ends it cleanly (the id is
        free again at once).
        """
        await self.start()
        rid = request_id or uuid.uuid4().hex
        if rid in self._wire:
            raise RequestRejected(f"request id {rid!r} is already in use by this client", rid)
        # an id this client left early may still have messages on the way: a fresh wire id
        wire = rid if rid not in self._abandoned else f"{rid}#{uuid.uuid4().hex[:8]}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[wire] = q
        self._wire[rid] = wire
        sent = finished = False
        running = (sampling or SamplingParams()).n  # samples not finished yet
        try:
            await self._send(
                GenerateRequest(
                    request_id=wire,
                    prompt_token_ids=prompt_token_ids,
                    prompt=prompt,
                    sampling=sampling or SamplingParams(),
                    priority=priority,
                    cache_salt=cache_salt,
                )
            )
            sent = True
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
                if isinstance(reply, BaseException):
                    finished = True
                    raise reply
                if isinstance(reply, RequestError):
                    finished = True
                    raise error_from(msgspec.structs.replace(reply, request_id=rid))
                if wire != rid:
                    reply = msgspec.structs.replace(reply, request_id=rid)
                if reply.finish_reason is not None:
                    running -= 1
                    if running <= 0:  # the consumer may stop here: nothing to abort
                        finished = True
                        self._queues.pop(wire, None)
                        self._wire.pop(rid, None)
                        yield reply
                        return
                yield reply
        finally:
            if self._queues.get(wire) is q:
                del self._queues[wire]
            if self._wire.get(rid) == wire:
                del self._wire[rid]
            if sent and not finished:
                self._abandoned.add(rid)
                if not self._closed and self._up.is_set():
                    with contextlib.suppress(Exception):
                        await self._send(AbortRequest(request_id=wire, silent=True))

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
        await self._send(AbortRequest(request_id=self._wire.get(request_id, request_id)))


class Client:
    """Blocking client: runs an AsyncClient on a private event loop thread."""

    def __init__(self, address: str, *, timeout: float = 600.0, **kw):
        """``kw``: AsyncClient's (connect_timeout, heartbeat_s, server_key, client_key)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="greenroom-client", daemon=True
        )
        self._thread.start()
        self._ctx = zmq.asyncio.Context()
        self._async = AsyncClient(address, timeout=timeout, context=self._ctx, **kw)
        try:
            self._call(self._async.start())
        except BaseException:
            self.close()
            raise

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
