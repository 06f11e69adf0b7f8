"""Frontend actor: the client-facing ROUTER socket.

It validates requests (clear, typed errors that touch no other request), hands valid ones to
the scheduler, streams the scheduler's per-iteration deltas back to each client in one frame per
client, and aborts the requests of a client that aborts or disconnects (ROUTER_MANDATORY makes a
send to a vanished peer fail, so a disconnect is noticed at the request's next delta).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import msgspec

from greenroom.actors import Actor, ActorRef, MailboxFull, handles, request_checks
from greenroom.actors.client_outbox import RETRY_S, ClientOutbox
from greenroom.actors.detokenizer import SampleText
from greenroom.actors.request_checks import FrontendLimits, normalize_sampling
from greenroom.bus.messages import (
    AbortRequest,
    CancelRequests,
    ClientMessages,
    DecodeRequest,
    GenerateRequest,
    KVLeaseRelease,
    KVStats,
    KVStatsQuery,
    NodeStats,
    NodeStatsQuery,
    OutputBatch,
    PrefillRequest,
    ReleaseKV,
    RequestError,
    ServerInfo,
    ServerInfoQuery,
    SubmitRequest,
    TransferDone,
    TransferHandle,
    sample_request_id,
)
from greenroom.bus.security import SocketSecurity, ZapHandler
from greenroom.bus.transport import Channel
from greenroom.logging import get_logger

log = get_logger(__name__)

_decoder = msgspec.msgpack.Decoder(ClientMessages)
_encoder = msgspec.msgpack.Encoder()


LOG_EVERY_S = 10.0  # at most one log line per this many seconds about malformed frames


class Frontend(Actor):
    """Serves the client library on one ROUTER socket."""

    mailbox_size = 4096

    def __init__(
        self,
        address: str,
        limits: FrontendLimits,
        info: ServerInfo,
        tokenizer=None,
        *,
        max_message_bytes: int = 0,
        heartbeat_s: float = 0.0,
        security: SocketSecurity | None = None,
        insecure: bool = False,
    ):
        super().__init__()
        self.max_message_bytes = max_message_bytes
        self.heartbeat_s = heartbeat_s
        self.security = security
        self.insecure = insecure  # bind beyond loopback without keys (security.insecure)
        self._zap: ZapHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # request ids are scoped per client: the bus id of (client, id) is unique to this
        # frontend, so a client can neither see nor squat another's ids
        self._by_client: dict[tuple[bytes, str], str] = {}  # (client, its id) -> bus id
        self._client_rid: dict[str, str] = {}  # bus id -> the client's id
        self._aborted: set[str] = set()  # bus ids the client aborted (id reusable at once)
        self._detached: set[str] = set()  # aborted, id reused: last messages not sent
        self._outboxes: dict[bytes, ClientOutbox] = {}
        self._seq = 0
        self._max_token_chars = _max_token_chars(tokenizer)
        self._malformed_logged_at = 0.0
        self._malformed_unlogged = 0
        self.address = address
        self.limits = limits
        self.info = info
        self.tokenizer = tokenizer
        self.scheduler: ActorRef | None = None
        self.kv: ActorRef | None = None
        self._channel: Channel | None = None
        self._owner: dict[str, bytes] = {}  # request id -> client identity
        self._texts: dict[tuple[str, int], SampleText] = {}  # (request id, sample index)
        self._samples: dict[str, list[int]] = {}  # request id -> [n, still running], n > 1
        # disaggregated roles: who gets a lease's handle / a receive's TransferDone, and who
        # may release a lease
        self._receiver: dict[str, bytes] = {}
        self._lessee: dict[str, bytes] = {}
        self._leasing: set[str] = set()  # prefill requests whose handle is still to come
        self.bound_address: str = address
        self.stats = defaultdict(int)

    def attach(self, scheduler: ActorRef, kv: ActorRef | None = None) -> None:
        self.scheduler = scheduler
        self.kv = kv

    async def on_start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.security is not None:
            self._zap = ZapHandler(self.runtime.context, self.security)
        transport = self.runtime.transport()
        self._channel = transport.bind_router(
            self.address,
            on_frames=self._on_frames,
            max_message_bytes=self.max_message_bytes,
            heartbeat_s=self.heartbeat_s,
            security=self.security,
            insecure=self.insecure,
        )
        self.bound_address = self._channel.address

    async def on_stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    # ------------------------------------------------------------------ client side

    def _on_frames(self, frames: list) -> None:
        ident = bytes(frames[0])
        if len(frames) != 2:
            self._malformed(ident, None, f"expected one frame per message, got {len(frames) - 1}")
            return
        try:
            self._on_client_frame(ident, frames[1].bytes)
        except Exception as exc:  # one bad frame never stops the frontend
            log.warning("client frame failed", error=repr(exc))
            self._malformed(ident, None, f"the frontend could not handle it: {exc!r}")

    def _on_client_frame(self, ident: bytes, payload: bytes) -> None:
        try:
            msg = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            rid = _salvage_request_id(payload, self.limits.max_request_id_len)
            if rid is None:
                self._malformed(ident, payload, str(exc))
                return
            self.stats["invalid"] += 1
            self._reply(
                ident,
                [RequestError(request_id=rid, kind="invalid", message=f"malformed request: {exc}")],
            )
            return
        if isinstance(msg, DecodeRequest):
            self._on_decode(ident, msg)
        elif isinstance(msg, PrefillRequest):
            if msg.sampling.n > 1:
                self._refuse(
                    ident, msg.request_id, "n > 1 is not supported by disaggregated serving"
                )
            elif self.info.role != "context":
                self._refuse(
                    ident, msg.request_id, f"this node's role is {self.info.role!r}, not 'context'"
                )
            else:
                self._on_generate(ident, msg, lease_kv=True)
        elif isinstance(msg, GenerateRequest):
            self._on_generate(ident, msg)
        elif isinstance(msg, ReleaseKV):
            if self._lessee.get(msg.request_id) == ident and self.kv is not None:
                del self._lessee[msg.request_id]
                self._release_lease(msg.request_id, msg.outcome)
        elif isinstance(msg, AbortRequest):
            self.stats["aborts"] += 1
            bus = self._by_client.get((ident, msg.request_id), msg.request_id)
            if self._owner.get(bus) == ident and self.scheduler is not None:
                self._aborted.add(bus)
                if msg.silent:  # its id is free at once; a late message cannot reach a new one
                    self._detached.add(self._by_client.pop((ident, msg.request_id), bus))
                self._to_scheduler(CancelRequests(request_ids=[bus], reason="abort"))
        elif isinstance(msg, ServerInfoQuery):
            self._reply(ident, [msgspec.structs.replace(self.info, request_id=msg.request_id)])
        elif isinstance(msg, NodeStatsQuery):
            self.spawn_task(self._answer_stats(ident, msg.request_id))

    def _malformed(self, ident: bytes, payload: bytes | None, why: str) -> None:
        """A frame with no readable request id: the sender hears why; the log is rate-limited."""
        self.stats["malformed"] += 1
        self._reply(ident, [RequestError(request_id="", kind="malformed", message=why)])
        now = time.monotonic()
        if now - self._malformed_logged_at < LOG_EVERY_S:
            self._malformed_unlogged += 1
            return
        log.warning(
            "malformed client frame",
            reason=why[:200],
            size=len(payload) if payload is not None else None,
            suppressed=self._malformed_unlogged,
        )
        self._malformed_logged_at, self._malformed_unlogged = now, 0

    async def _answer_stats(self, ident: bytes, request_id: str) -> None:
        """Node stats from the scheduler and the KV manager: an answer proves both alive."""
        try:
            if self.scheduler is None or self.kv is None:
                raise RuntimeError("the server is starting")
            from greenroom.actors.scheduler import SchedulerStatsQuery

            sched: dict = await self.scheduler.ask(SchedulerStatsQuery(), timeout=5.0)
            kv: KVStats = await self.kv.ask(KVStatsQuery(), timeout=5.0)
        except Exception as exc:
            self._reply(
                ident,
                [RequestError(request_id=request_id, kind="failed", message=f"no stats: {exc}")],
            )
            return
        self._reply(
            ident,
            [
                NodeStats(
                    request_id=request_id,
                    running=int(sched.get("active", 0)),
                    waiting=int(sched.get("waiting", 0)),
                    kv_total_blocks=kv.total_blocks,
                    kv_free_blocks=kv.free_blocks,
                    tokens_per_block=self.info.tokens_per_block,
                    prefix_query_blocks=kv.lookups_blocks,
                    prefix_hit_blocks=kv.hit_blocks,
                    prompt_tokens=int(sched.get("prefill_tokens", 0)),
                    generation_tokens=int(sched.get("output_tokens", 0)),
                )
            ],
        )

    def _refuse(self, ident: bytes, rid: str, message: str, kind: str = "invalid") -> None:
        self.stats["invalid"] += 1
        self._reply(ident, [RequestError(request_id=rid, kind=kind, message=message)])

    def _release_lease(self, rid: str, outcome: str) -> None:
        msg = KVLeaseRelease(request_id=rid, outcome=outcome)
        try:
            self.kv.tell_nowait(msg)
        except MailboxFull:
            self.spawn_task(self.kv.tell(msg))

    def _on_decode(self, ident: bytes, req: DecodeRequest) -> None:
        """A generation node admits a prefilled request: every answer starts with one
        TransferDone, so the router can acknowledge the context node."""
        rid = req.request_id
        reason = None
        if self.info.role != "generation":
            reason = f"this node's role is {self.info.role!r}, not 'generation'"
        elif rid in self._owner or rid in self._receiver:
            reason = f"duplicate request id {rid!r}: a request with this id is still running"
        elif req.prompt_token_ids is None:
            reason = "a decode request carries prompt_token_ids"
        elif req.sampling.n > 1:
            reason = "n > 1 is not supported by disaggregated serving"
        else:
            reason = request_checks.validate_handle(
                req.handle, req, req.prompt_token_ids, self.info
            )
        if reason is not None:
            self.stats["invalid"] += 1
            self._reply(
                ident,
                [
                    TransferDone(request_id=rid, state="error", message=reason),
                    RequestError(request_id=rid, kind="invalid", message=reason),
                ],
            )
            return
        self._receiver[rid] = ident
        if not self._on_generate(ident, req, kv_handle=req.handle):
            self._receiver.pop(rid, None)
            self._reply(ident, [TransferDone(request_id=rid, state="error", message="refused")])

    def _on_generate(
        self,
        ident: bytes,
        req: GenerateRequest,
        lease_kv: bool = False,
        kv_handle: TransferHandle | None = None,
    ) -> bool:
        """Validate and submit; False when refused (the client has its error)."""
        rid = req.request_id
        reason = request_checks.check_request(req, self.limits)  # before any tokenizing
        if reason is not None:
            self._refuse(ident, rid, reason)
            return False
        scoped = not lease_kv and kv_handle is None  # disaggregated flows keep the router's ids
        key = (ident, rid)
        if scoped and key in self._by_client and self._by_client[key] in self._aborted:
            self._detached.add(self._by_client.pop(key))  # the client left it: it ends unseen
        if (scoped and key in self._by_client) or (not scoped and rid in self._owner):
            self._reply(
                ident,
                [
                    RequestError(
                        request_id=rid,
                        kind="invalid",
                        message=f"duplicate request id {rid!r}: a request with this id is still running",
                    )
                ],
            )
            return False
        prompt_ids = req.prompt_token_ids
        if prompt_ids is None and req.prompt is not None:
            if self.tokenizer is None:
                self._reply(
                    ident,
                    [
                        RequestError(
                            request_id=rid,
                            kind="invalid",
                            message="text prompts need a tokenizer.json in the model directory; send prompt_token_ids",
                        )
                    ],
                )
                return False
            size = len(req.prompt.encode())
            if size > (self.limits.max_model_len - 1) * self._max_token_chars:
                self._refuse(
                    ident,
                    rid,
                    f"the prompt has {size} bytes: more tokens than max_model_len "
                    f"({self.limits.max_model_len}) allows",
                )
                return False
            prompt_ids = self.tokenizer.encode(req.prompt).ids
        elif prompt_ids is not None and req.prompt is not None:
            self._reply(
                ident,
                [
                    RequestError(
                        request_id=rid,
                        kind="invalid",
                        message="give either prompt or prompt_token_ids, not both",
                    )
                ],
            )
            return False
        reason = request_checks.validate(req, self.limits, prompt_ids or [])
        if reason is None and req.sampling.stop and self.tokenizer is None:
            reason = "stop strings need a tokenizer.json in the model directory; use stop_token_ids"
        if reason is not None:
            self.stats["invalid"] += 1
            self._reply(ident, [RequestError(request_id=rid, kind="invalid", message=reason)])
            return False
        if self.scheduler is None:  # bound before the scheduler exists: the node is starting
            self._reply(
                ident,
                [
                    RequestError(
                        request_id=rid,
                        kind="overloaded",
                        message="the server is starting; retry shortly",
                    )
                ],
            )
            return False
        bus = rid
        if scoped:
            self._seq += 1
            bus = f"{rid}@{self._seq:x}"
            self._by_client[key] = bus
            self._client_rid[bus] = rid
        self._owner[bus] = ident
        s = req.sampling
        if s.n > 1:
            self._samples[bus] = [s.n, s.n]
        if self.tokenizer is not None:
            for i in range(s.n):
                self._texts[(bus, i)] = SampleText(self.tokenizer, s.stop, s.min_tokens)
        if lease_kv:
            self._leasing.add(bus)
        self.stats["submitted"] += 1
        self._to_scheduler(
            SubmitRequest(
                request_id=bus,
                prompt_token_ids=list(prompt_ids),
                sampling=normalize_sampling(req.sampling, self.limits),
                priority=req.priority,
                cache_salt=req.cache_salt,
                arrival_time=time.time(),
                lease_kv=lease_kv,
                kv_handle=kv_handle,
            )
        )
        return bus in self._owner

    def _to_scheduler(self, msg) -> None:
        try:
            self.scheduler.tell_nowait(msg)
        except MailboxFull:
            if isinstance(msg, SubmitRequest):
                client_rid = self._client_rid.get(msg.request_id, msg.request_id)
                ident = self._drop(msg.request_id)
                self._leasing.discard(msg.request_id)
                self._reply(
                    ident,
                    [
                        RequestError(
                            request_id=client_rid,
                            kind="overloaded",
                            message="overloaded: the scheduler's mailbox is full; retry later",
                        )
                    ],
                )
            else:  # an abort must not be lost: deliver it as soon as there is room
                self.spawn_task(self.scheduler.tell(msg))

    def _reply(self, ident: bytes, items: list) -> bool:
        """Send replies to a client; False only when it is gone. A client whose socket is full
        gets them later: they wait in its outbox, a request's deltas merged into one."""
        box = self._outboxes.get(ident)
        if box is None:
            sent = self._write(ident, items)
            if sent is not False:
                return sent is True
            box = self._outboxes[ident] = ClientOutbox()
            self.stats["backpressure"] += 1
        for item in items:
            box.add(item)
        self._schedule_flush(ident, box)
        return True

    def _write(self, ident: bytes, items: list) -> bool | None:
        """True: sent; False: the client's socket is full; None: the client is gone."""
        if self._channel is None or self._channel.closed:
            return None
        return self._channel.try_send_to_peer([ident, _encoder.encode(items)])

    def _schedule_flush(self, ident: bytes, box: ClientOutbox) -> None:
        if box.scheduled or self._loop is None:
            return
        box.scheduled = True
        self._loop.call_later(box.retry_s, self._flush, ident)
        box.retry_s = min(box.retry_s * 2, RETRY_S[1])

    def _flush(self, ident: bytes) -> None:
        box = self._outboxes.get(ident)
        if box is None:
            return
        box.scheduled = False
        sent = self._write(ident, box.items)
        if sent is False:
            self._schedule_flush(ident, box)
            return
        del self._outboxes[ident]
        if sent is None:
            self._client_gone(ident)

    def _client_gone(self, ident: bytes) -> None:
        """The peer vanished: abort its requests (the scheduler's answers are then dropped)."""
        self._outboxes.pop(ident, None)
        gone = [rid for rid, owner in self._owner.items() if owner == ident]
        for rid in gone:
            self._forget(rid)
        if gone and self.scheduler is not None:
            self.stats["disconnected"] += len(gone)
            self._to_scheduler(CancelRequests(request_ids=gone, reason="client disconnected"))

    # ------------------------------------------------------------------ scheduler side

    @handles(OutputBatch)
    async def on_output(self, batch: OutputBatch) -> None:
        per_client: dict[bytes, list] = defaultdict(list)
        stopped: list[str] = []
        for done in batch.transfers:
            ident = self._receiver.pop(done.request_id, None)
            if ident is not None:
                per_client[ident].append(done)
        for delta in batch.deltas:
            rid = delta.request_id
            ident = self._owner.get(rid)
            if ident is None:
                continue
            key = (rid, delta.index)
            text = self._texts.get(key)
            if text is not None:
                was_stopped = text.stopped
                delta = text.process(delta)
                if delta is None:
                    continue
                if text.stopped and not was_stopped and delta.finish_reason is None:
                    n = self._samples[rid][0] if rid in self._samples else 1
                    stopped.append(sample_request_id(rid, key[1], n))
            if rid not in self._detached:
                client_rid = self._client_rid.get(rid)
                if client_rid is not None:
                    delta = msgspec.structs.replace(delta, request_id=client_rid)
                per_client[ident].append(delta)
            if delta.finish_reason is not None:
                self._leasing.discard(rid)
                self._texts.pop(key, None)
                self._sample_finished(rid)
        for handle in batch.handles:
            ident = self._forget(handle.request_id)
            self._leasing.discard(handle.request_id)
            if ident is None or not self._reply(ident, [handle]):
                self._release_lease(handle.request_id, "cancelled")  # no one will read it
            else:
                self._lessee[handle.request_id] = ident
                self.stats["leased"] += 1
        for err in batch.errors:
            self._leasing.discard(err.request_id)
            detached = err.request_id in self._detached
            client_rid = self._client_rid.get(err.request_id, err.request_id)
            ident = self._forget(err.request_id)
            if ident is not None and not detached:
                per_client[ident].append(msgspec.structs.replace(err, request_id=client_rid))
                self.stats[f"error_{err.kind}"] += 1
        gone: list[str] = []
        for ident, items in per_client.items():
            if not self._reply(ident, items):
                gone.extend(rid for rid, owner in self._owner.items() if owner == ident)
        if stopped and self.scheduler is not None:
            await self.scheduler.tell(CancelRequests(request_ids=stopped, reason="stop"))
        if gone and self.scheduler is not None:
            for rid in gone:
                self._forget(rid)
            self.stats["disconnected"] += len(gone)
            await self.scheduler.tell(
                CancelRequests(request_ids=gone, reason="client disconnected")
            )

    def _sample_finished(self, rid: str) -> None:
        counts = self._samples.get(rid)
        if counts is not None and counts[1] > 1:
            counts[1] -= 1
            return
        self._drop(rid)
        self.stats["finished"] += 1

    def _forget(self, rid: str) -> bytes | None:
        """Drop a request's state; an n > 1 request's other samples are cancelled."""
        grouped = rid in self._samples
        ident = self._drop(rid)
        if grouped and self.scheduler is not None:
            self._to_scheduler(CancelRequests(request_ids=[rid], reason="abort"))
        return ident

    def _drop(self, rid: str) -> bytes | None:
        """Forget a request here; returns its client."""
        n = self._samples.pop(rid, [1])[0]
        for i in range(n):
            self._texts.pop((rid, i), None)
        ident = self._owner.pop(rid, None)
        client_rid = self._client_rid.pop(rid, None)
        if client_rid is not None and self._by_client.get((ident, client_rid)) == rid:
            del self._by_client[(ident, client_rid)]
        self._aborted.discard(rid)
        self._detached.discard(rid)
        return ident

    def in_flight(self) -> int:
        """Requests this frontend is tracking (submitted, not yet ended)."""
        return len(self._owner)

    def pending_clients(self) -> int:
        """Clients with replies waiting for room in their socket."""
        return len(self._outboxes)


def _salvage_request_id(payload: bytes, max_len: int) -> str | None:
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= max_len else None


def _max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry in bytes: a text of n bytes has at least n / this tokens."""
    if tokenizer is None:
        return 1
    try:
        return max(1, max(len(t.encode()) for t in tokenizer.get_vocab()))
    except Exception:
        return 1 << 10


__all__ = ["Frontend", "FrontendLimits"]
