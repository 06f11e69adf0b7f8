"""One request's scheduling state: tokens, blocks, phase and the plans that hold it.

Token positions: the sequence is ``prompt + output[num_prompt_output:]``. ``prompt`` is
the original prompt, or after a preemption the original prompt plus every token generated
before it (recompute). ``num_scheduled`` counts the leading positions whose KV some issued
plan computes; a step that reaches the end of the known sequence samples one token.
"""

from __future__ import annotations

import enum
import time

from greenroom.bus.messages import (
    KVAdmitted,
    KVFree,
    NewSequence,
    RequestMetrics,
    SamplingParams,
    SubmitRequest,
    TransferHandle,
)


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"  # admitted, prompt not fully scheduled
    DECODE = "decode"  # prompt fully scheduled; one token per step from here on
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


class KVWait(enum.Enum):
    """Generation role: where a request's KV receive stands (NONE: nothing to receive)."""

    NONE = 0
    ADMIT = 1  # has a handle, no blocks yet
    READ = 2  # blocks allocated, the read is handed to the engine: waiting_for_kv
    CANCEL = 3  # ended while reading: blocks stay until the engine confirms the read is off


class FreeState(enum.Enum):
    NONE = 0  # nothing to free (no blocks, or blocks in use)
    PENDING = 1  # blocks must go back once no draft or in-flight plan holds the request
    SENT = 2  # a KVStep carries the free; done when its result is applied


class Request:
    """Mutable state of one request, owned by the scheduler core."""

    __slots__ = (
        "request_id",
        "client_id",
        "sample_index",
        "sampling",
        "priority",
        "cache_salt",
        "arrival_time",
        "num_original_prompt",
        "max_output",
        "prompt",
        "num_prompt_output",
        "output",
        "state",
        "flow",
        "known_by",
        "epoch",
        "admit_seq",
        "block_ids",
        "num_cached",
        "num_scheduled",
        "num_reported",
        "pending_samples",
        "handoff_event_id",
        "holds",
        "in_flight",
        "has_blocks",
        "free_state",
        "kv_free",
        "admit_stats",
        "preemptions",
        "finish_reason",
        "queue_time_s",
        "lease_kv",
        "kv_handle",
        "kv_wait",
        "leasing",
    )

    def __init__(self, req: SubmitRequest, max_model_len: int) -> None:
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError(f"request {req.request_id!r}: empty prompt")
        if req.sampling.max_tokens < 1:
            raise ValueError(f"request {req.request_id!r}: max_tokens must be >= 1")
        if n >= max_model_len:
            raise ValueError(
                f"request {req.request_id!r}: prompt of {n} tokens leaves no room "
                f"under max_model_len = {max_model_len}"
            )
        self.request_id = req.request_id
        self.client_id = req.request_id  # the id the client knows (one per n samples)
        self.sample_index = 0
        self.sampling: SamplingParams = req.sampling
        self.priority = req.priority
        self.cache_salt = req.cache_salt
        self.arrival_time = req.arrival_time
        self.num_original_prompt = n
        self.max_output = min(req.sampling.max_tokens, max_model_len - n)
        self.prompt: list[int] = list(req.prompt_token_ids)
        self.num_prompt_output = 0
        self.output: list[int] = []
        self.state = RequestState.WAITING
        self.flow: str | None = None  # the flow that schedules it now
        self.known_by: set[str] = set()  # flows whose engine holds a NewSequence for it
        self.epoch = 0  # bumped on preemption; results of older plans are dropped
        self.admit_seq = -1
        self.block_ids: list[int] = []
        self.num_cached = 0
        self.num_scheduled = 0
        self.num_reported = 0  # last KVComputed sent
        self.pending_samples = 0  # tokens that issued plans will sample
        self.handoff_event_id = 0
        self.holds = 0  # drafts + in-flight plans that include it
        self.in_flight = 0  # issued plans that include it (at most 1 when pipelined)
        self.has_blocks = False
        self.free_state = FreeState.NONE
        self.kv_free: KVFree | None = None
        self.admit_stats: KVAdmitted | None = None  # first admission's KV statistics
        self.preemptions = 0
        self.finish_reason: str | None = None
        self.queue_time_s = 0.0
        self.lease_kv = req.lease_kv  # context role: lease the blocks after the first token
        self.leasing = False  # its free asks the KV manager for a lease
        self.kv_handle: TransferHandle | None = req.kv_handle
        self.kv_wait = KVWait.NONE
        h = req.kv_handle
        if h is not None:
            # the context node sampled the first token: it is output already, and its KV is
            # what the first local step computes (prompt KV arrives by the read)
            if h.num_tokens != n:
                raise ValueError(
                    f"request {req.request_id!r}: the handle holds {h.num_tokens} tokens, "
                    f"the prompt has {n}"
                )
            if n + 1 >= max_model_len:
                raise ValueError(f"request {req.request_id!r}: no room to decode")
            self.prompt.append(h.first_token)
            self.output.append(h.first_token)
            self.num_prompt_output = 1
            self.kv_wait = KVWait.ADMIT

    # ------------------------------------------------------------------ positions

    @property
    def prompt_left(self) -> int:
        """Prompt tokens no plan has scheduled yet."""
        return max(0, len(self.prompt) - self.num_scheduled)

    @property
    def outputs_expected(self) -> int:
        return len(self.output) + self.pending_samples

    def can_decode(self) -> bool:
        """One more decode fits: the previous step samples a token and the limit allows one more."""
        return (
            self.state is RequestState.DECODE
            and self.outputs_expected < self.max_output
            and not self.lease_kv  # a context-role request stops at its first token
        )

    @property
    def waiting_for_kv(self) -> bool:
        return self.kv_wait is not KVWait.NONE

    @property
    def live(self) -> bool:
        return self.state in (RequestState.PREFILL, RequestState.DECODE)

    def sequence(self) -> list[int]:
        return self.prompt + self.output[self.num_prompt_output :]

    # ------------------------------------------------------------------ transitions

    def admitted(self, result: KVAdmitted, admit_seq: int, flow: str) -> None:
        self.block_ids = list(result.block_ids)
        # the last prompt token is always computed: it samples the next token
        self.num_cached = min(result.num_cached_tokens, len(self.prompt) - 1)
        self.num_scheduled = self.num_cached
        self.num_reported = self.num_cached
        self.admit_seq = admit_seq
        self.state = RequestState.PREFILL
        self.flow = flow
        if self.admit_stats is None:
            self.admit_stats = result
            if self.arrival_time:
                self.queue_time_s = max(0.0, time.time() - self.arrival_time)
        if self.kv_wait is KVWait.ADMIT:
            self.kv_wait = KVWait.READ

    def kv_received(self) -> None:
        """The read completed: every prompt token but the handed-over first token has KV."""
        self.kv_wait = KVWait.NONE
        self.kv_handle = None
        self.num_scheduled = self.num_cached = len(self.prompt) - 1

    def schedule(self, num_tokens: int) -> bool:
        """Account one step of ``num_tokens``; True when the step samples a token."""
        self.num_scheduled += num_tokens
        if self.state is RequestState.PREFILL and self.num_scheduled >= len(self.prompt):
            self.state = RequestState.DECODE
        samples = self.state is RequestState.DECODE
        if samples:
            self.pending_samples += 1
        return samples

    def new_sequence(self) -> NewSequence:
        """What an engine that has not seen this request needs: the sequence so far, once."""
        return NewSequence(
            request_id=self.request_id,
            prompt_token_ids=self.sequence(),
            sampling=self.sampling,
            num_cached_tokens=self.num_scheduled,
            block_ids=list(self.block_ids),
            num_output_tokens=len(self.output),
            handoff_event_id=self.handoff_event_id,
        )

    def stop_reason(self, token: int, eos_token_ids: frozenset[int]) -> str | None:
        """Finish reason after ``token`` was appended, or None to go on."""
        if len(self.output) <= self.sampling.min_tokens:
            # the engine masks EOS and stop ids until min_tokens are out
            return "length" if len(self.output) >= self.max_output else None
        if token in self.sampling.stop_token_ids:
            return "stop"
        if not self.sampling.ignore_eos and token in eos_token_ids:
            return "stop"
        if len(self.output) >= self.max_output:
            return "length"
        return None

    def release_blocks(self, with_output: bool) -> None:
        """Drop the blocks from this request's view and remember what to tell the KV manager."""
        if not self.has_blocks or self.free_state is not FreeState.NONE:
            return
        # generated tokens up to the first one without KV (the KV manager counts every token
        # but the last as written), so their full blocks can be reused
        end = self.num_scheduled + 1
        generated = self.sequence()[len(self.prompt) : end] if with_output else []
        self.kv_free = KVFree(self.request_id, generated, self.leasing)
        self.free_state = FreeState.PENDING
        self.block_ids = []

    def preempt(self) -> None:
        """Back to waiting; the prompt becomes everything known so far (recompute)."""
        self.release_blocks(with_output=True)
        self.prompt = self.prompt + self.output[self.num_prompt_output :]
        self.num_prompt_output = len(self.output)
        self.state = RequestState.WAITING
        self.flow = None
        self.known_by = set()
        self.epoch += 1
        self.num_cached = 0
        self.num_scheduled = 0
        self.num_reported = 0
        self.pending_samples = 0
        self.handoff_event_id = 0
        self.preemptions += 1
        self.kv_handle = None  # recomputed locally from here on

    def metrics(self) -> RequestMetrics:
        s = self.admit_stats
        return RequestMetrics(
            num_prompt_tokens=self.num_original_prompt,
            num_output_tokens=len(self.output),
            num_cached_tokens=min(s.num_cached_tokens, self.num_original_prompt - 1) if s else 0,
            reused_blocks=s.reused_blocks if s else 0,
            onboarded_blocks=s.onboarded_blocks if s else 0,
            new_blocks=s.new_blocks if s else 0,
            missed_blocks=s.missed_blocks if s else 0,
            preemptions=self.preemptions,
            queue_time_s=self.queue_time_s,
        )
