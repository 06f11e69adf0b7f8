"""Frontend actor: the client-facing ROUTER socket.

It validates requests (clear, typed errors that touch no other request), hands valid ones to
the scheduler, streams the scheduler's per-iteration deltas back to each client in one frame per
client, and aborts the requests of a client that aborts or disconnects (ROUTER_MANDATORY makes a
send to a vanished peer fail, so a disconnect is noticed at the request's next delta).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import msgspec

from greenroom.actors import Actor, ActorRef, MailboxFull, handles
from greenroom.actors.detokenizer import SampleText
from greenroom.bus.messages import (
    SAMPLE_SEPARATOR,
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
    SamplingParams,
    ServerInfo,
    ServerInfoQuery,
    SubmitRequest,
    TokenDelta,
    TransferDone,
    TransferHandle,
    sample_request_id,
)
from greenroom.bus.transport import Channel
from greenroom.logging import get_logger

log = get_logger(__name__)

_decoder = msgspec.msgpack.Decoder(ClientMessages)
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class FrontendLimits:
    max_model_len: int
    vocab_size: int


def validate(req: GenerateRequest, limits: FrontendLimits, prompt_ids: list[int]) -> str | None:
    """The reason a request is invalid, or None."""
    s = req.sampling
    if not req.request_id:
        return "request_id must be a non-empty string"
    if SAMPLE_SEPARATOR in req.request_id:
        return "request_id must not contain the character U+001F"
    if not prompt_ids:
        return "the prompt is empty"
    n = len(prompt_ids)
    if n >= limits.max_model_len:
        return f"the prompt has {n} tokens; max_model_len is {limits.max_model_len} (prompt must be shorter)"
    if any(t < 0 or t >= limits.vocab_size for t in prompt_ids):
        bad = next(t for t in prompt_ids if t < 0 or t >= limits.vocab_size)
        return f"prompt token id {bad} is outside the vocabulary [0, {limits.vocab_size})"
    if s.max_tokens < 1:
        return f"max_tokens = {s.max_tokens} is invalid: must be >= 1"
    if n + s.max_tokens > limits.max_model_len:
        return (
            f"prompt ({n} tokens) + max_tokens ({s.max_tokens}) exceeds max_model_len "
            f"({limits.max_model_len})"
        )
    if not s.temperature >= 0.0:
        return f"temperature = {s.temperature} is invalid: must be >= 0"
    if not 0.0 < s.top_p <= 1.0:
        return f"top_p = {s.top_p} is invalid: must be in (0, 1]"
    if s.top_k < -1 or s.top_k == 0:
        return f"top_k = {s.top_k} is invalid: must be -1 (disabled) or >= 1"
    if s.logprobs < 0 or s.logprobs > 20:
        return f"logprobs = {s.logprobs} is invalid: must be in [0, 20]"
    if not 0 <= req.priority <= 100:
        return f"priority = {req.priority} is invalid: must be in [0, 100]"
    return validate_sampling_options(s, limits)


MAX_SAMPLES = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 1024
MAX_REPETITION_PENALTY = 10.0


def validate_sampling_options(s: SamplingParams, limits: FrontendLimits) -> str | None:
    """The reason the stop / min_tokens / penalty / logit_bias / n fields are invalid, or None."""
    if not 1 <= s.n <= MAX_SAMPLES:
        return f"n = {s.n} is invalid: must be in [1, {MAX_SAMPLES}]"
    if not 0 <= s.min_tokens <= s.max_tokens:
        return (
            f"min_tokens = {s.min_tokens} is invalid: must be in [0, max_tokens = {s.max_tokens}]"
        )
    if not (
        math.isfinite(s.repetition_penalty) and 0.0 < s.repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        return (
            f"repetition_penalty = {s.repetition_penalty} is invalid: "
            f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off)"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            return f"{name} = {value} is invalid: must be in [-2, 2]"
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        return f"logit_bias has {len(s.logit_bias)} entries: at most {MAX_LOGIT_BIAS}"
    for token, bias in s.logit_bias.items():
        if not 0 <= token < limits.vocab_size:
            return f"logit_bias token id {token} is outside the vocabulary [0, {limits.vocab_size})"
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            return f"logit_bias[{token}] = {bias} is invalid: must be in [-100, 100]"
    if len(s.stop) > MAX_STOP_STRINGS:
        return f"stop has {len(s.stop)} strings: at most {MAX_STOP_STRINGS}"
    for text in s.stop:
        if not 0 < len(text) <= MAX_STOP_CHARS:
            return (
                f"stop string {text[:40]!r} is invalid: must have 1 to {MAX_STOP_CHARS} characters"
            )
    return None


def validate_handle(
    h: TransferHandle, req: DecodeRequest, prompt_ids: list[int], info: ServerInfo
) -> str | None:
    """The reason a generation node refuses a transfer handle, or None."""
    if h.request_id != req.request_id:
        return f"the transfer handle is for request {h.request_id!r}, not {req.request_id!r}"
    if h.tp_size != info.tp_size:
        return (
            f"tp_size mismatch: the context node runs tp_size = {h.tp_size}, this generation "
            f"node tp_size = {info.tp_size}; pair nodes of equal tp_size"
        )
    if h.kv_layout != info.kv_layout or h.tokens_per_block != info.tokens_per_block:
        return (
            f"the context node's KV layout ({h.kv_layout}) differs from this node's "
            f"({info.kv_layout}): serve the same model and kv.tokens_per_block on both"
        )
    if h.num_tokens != len(prompt_ids):
        return f"the handle holds {h.num_tokens} tokens, the prompt has {len(prompt_ids)}"
    need = -(-h.num_tokens // h.tokens_per_block)
    if len(h.block_ids) != need:
        return f"the handle names {len(h.block_ids)} blocks; {h.num_tokens} tokens need {need}"
    if any(not 0 < b < h.pool_blocks for b in h.block_ids):
        return f"the handle names blocks outside the context pool [1, {h.pool_blocks})"
    if not 0 <= h.first_token < info.vocab_size:
        return f"first token {h.first_token} is outside the vocabulary [0, {info.vocab_size})"
    if req.sampling.max_tokens < 2:
        return "max_tokens < 2: the context node's first token was the whole output"
    if h.lease_deadline <= time.time():
        return "the transfer handle's lease has run out"
    return None


class Frontend(Actor):
    """Serves the client library on one ROUTER socket."""

    mailbox_size = 4096

    def __init__(self, address: str, limits: FrontendLimits, info: ServerInfo, tokenizer=None):
        super().__init__()
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
        transport = self.runtime.transport()
        self._channel = transport.bind_router(self.address, on_frames=self._on_frames)
        self.bound_address = self._channel.address

    async def on_stop(self) -> None:
        if self._channel is not None:
            self._channel.close()

    # ------------------------------------------------------------------ client side

    def _on_frames(self, frames: list) -> None:
        if len(frames) != 2:
            self.stats["malformed"] += 1
            return
        ident, payload = bytes(frames[0]), frames[1].bytes
        try:
            self._on_client_frame(ident, payload)
        except Exception as exc:  # one bad frame never stops the frontend
            log.warning("client frame failed", error=repr(exc))

    def _on_client_frame(self, ident: bytes, payload: bytes) -> None:
        try:
            msg = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            self.stats["invalid"] += 1
            rid = _salvage_request_id(payload)
            if rid is not None:
                self._reply(
                    ident,
                    [
                        RequestError(
                            request_id=rid, kind="invalid", message=f"malformed request: {exc}"
                        )
                    ],
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
            if self._owner.get(msg.request_id) == ident and self.scheduler is not None:
                self._to_scheduler(CancelRequests(request_ids=[msg.request_id], reason="abort"))
        elif isinstance(msg, ServerInfoQuery):
            self._reply(ident, [msgspec.structs.replace(self.info, request_id=msg.request_id)])
        elif isinstance(msg, NodeStatsQuery):
            self.spawn_task(self._answer_stats(ident, msg.request_id))

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
            reason = validate_handle(req.handle, req, req.prompt_token_ids, self.info)
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
        if rid in self._owner:
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
        reason = validate(req, self.limits, prompt_ids or [])
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
        self._owner[rid] = ident
        s = req.sampling
        if s.n > 1:
            self._samples[rid] = [s.n, s.n]
        if self.tokenizer is not None:
            for i in range(s.n):
                self._texts[(rid, i)] = SampleText(self.tokenizer, s.stop, s.min_tokens)
        if lease_kv:
            self._leasing.add(rid)
        self.stats["submitted"] += 1
        self._to_scheduler(
            SubmitRequest(
                request_id=rid,
                prompt_token_ids=list(prompt_ids),
                sampling=req.sampling,
                priority=req.priority,
                cache_salt=req.cache_salt,
                arrival_time=time.time(),
                lease_kv=lease_kv,
                kv_handle=kv_handle,
            )
        )
        return rid in self._owner

    def _to_scheduler(self, msg) -> None:
        try:
            self.scheduler.tell_nowait(msg)
        except MailboxFull:
            if isinstance(msg, SubmitRequest):
                ident = self._drop(msg.request_id)
                self._leasing.discard(msg.request_id)
                self._reply(
                    ident,
                    [
                        RequestError(
                            request_id=msg.request_id,
                            kind="overloaded",
                            message="overloaded: the scheduler's mailbox is full; retry later",
                        )
                    ],
                )
            else:  # an abort must not be lost: deliver it as soon as there is room
                self.spawn_task(self.scheduler.tell(msg))

    def _reply(self, ident: bytes, items: list) -> bool:
        """Send one frame to a client; False when the client is gone or hopelessly behind."""
        assert self._channel is not None
        return bool(self._channel.try_send_to_peer([ident, _encoder.encode(items)]))

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
            ident = self._forget(err.request_id)
            if ident is not None:
                per_client[ident].append(err)
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
        return self._owner.pop(rid, None)

    def in_flight(self) -> int:
        return len(self._owner)


def _salvage_request_id(payload: bytes) -> str | None:
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) else None


__all__ = ["Frontend", "FrontendLimits", "TokenDelta", "validate"]
