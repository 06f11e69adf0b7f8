"""The choices of one API request: node requests streamed through the client library.

Each prompt is one node request with the node's own `n` (its samples share the prompt's KV
blocks and draw with seeds `seed + i`) and its own stop strings (matched by the node on the
detokenized text, which it cuts before the stop string). Choice `p * n + i` is sample `i` of
prompt `p`. Request-level metrics are recorded per sample as the tokens arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from greenroom.bus.messages import SamplingParams, TokenLogprobs
from greenroom.client import AsyncClient, GreenroomError
from greenroom.http.errors import invalid
from greenroom.http.metrics import HttpMetrics
from greenroom.http.protocol import _Common
from greenroom.http.text import TextCodec

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class PromptJob:
    """One node request: a prompt and its sampling; its choices start at `first_index`."""

    first_index: int
    prompt_ids: list[int]
    sampling: SamplingParams


@dataclass(slots=True)
class ChoiceEvent:
    """New output of one choice; the last event of a choice has `finish_reason` set."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    cached_tokens: int = 0

    def merge(self, later: ChoiceEvent) -> None:
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs:
            self.logprobs = [*(self.logprobs or []), *later.logprobs]
        self.finish_reason = later.finish_reason or self.finish_reason
        self.cached_tokens = later.cached_tokens or self.cached_tokens


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, ev: ChoiceEvent) -> None:
        self.completion_tokens += len(ev.token_ids)
        if ev.finish_reason is not None:
            self.cached_tokens += ev.cached_tokens

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


# sampling fields passed through unchanged when they differ from the default
_PASSED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
}


def sampling_params(req: _Common, max_tokens: int, logprobs: int) -> SamplingParams:
    """The node's SamplingParams for each prompt of `req`."""
    if req.n < 1:
        raise invalid(f"n = {req.n} is invalid: must be >= 1", "n")
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(
            f"logprobs = {logprobs} is invalid: must be in [0, {MAX_LOGPROBS}]", "logprobs"
        )
    extra: dict = {
        name: getattr(req, name) for name, d in _PASSED.items() if getattr(req, name) != d
    }
    if req.logit_bias:
        try:
            extra["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise invalid("logit_bias keys must be token ids", "logit_bias") from None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        stop=req.stop_strings(),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        n=req.n,
        **extra,
    )


def prompt_jobs(prompts: list[list[int]], sampling: SamplingParams) -> list[PromptJob]:
    return [PromptJob(p * sampling.n, ids, sampling) for p, ids in enumerate(prompts)]


class _SampleTimes:
    __slots__ = ("first", "last", "tokens", "queue_time")

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.tokens = 0
        self.queue_time: float | None = None


class Generation:
    def __init__(self, client: AsyncClient, metrics: HttpMetrics):
        self.client = client
        self.metrics = metrics

    async def prompt(self, job: PromptJob, arrival: float) -> AsyncIterator[ChoiceEvent]:
        """The events of one node request (all its samples)."""
        m, label = self.metrics, self.metrics.model_name
        samples = [_SampleTimes() for _ in range(job.sampling.n)]
        finished: dict[int, str] = {}
        failed = False
        try:
            async with contextlib.aclosing(
                self.client.stream(job.prompt_ids, job.sampling)
            ) as stream:
                async for delta in stream:
                    now = time.perf_counter()
                    st = samples[delta.index]
                    k = len(delta.token_ids)
                    if k:
                        if st.first is None:
                            st.first = now
                            m.ttft_m.observe(now - arrival)
                        else:
                            gap = (now - st.last) / k
                            for _ in range(k):
                                m.itl_m.observe(gap)
                        st.last = now
                        st.tokens += k
                    cached = 0
                    if delta.metrics is not None:
                        st.queue_time = delta.metrics.queue_time_s
                        cached = delta.metrics.num_cached_tokens
                    if delta.finish_reason is not None:
                        finished[delta.index] = delta.finish_reason
                        self._finished(job, st, delta.finish_reason, arrival)
                    yield ChoiceEvent(
                        job.first_index + delta.index,
                        delta.text or "",
                        list(delta.token_ids),
                        delta.logprobs,
                        delta.finish_reason,
                        cached,
                    )
        except GreenroomError as exc:
            failed = True
            m.request_failure.labels(label, exc.kind).inc(len(samples) - len(finished))
            raise
        finally:
            for i, st in enumerate(samples):  # samples cut short (client gone): aborted
                if i not in finished and not failed:
                    self._finished(job, st, "abort", arrival)

    def _finished(self, job: PromptJob, st: _SampleTimes, reason: str, arrival: float) -> None:
        m, label = self.metrics, self.metrics.model_name
        m.request_success.labels(label, reason).inc()
        m.prompt_tokens_m.inc(len(job.prompt_ids))
        m.generation_tokens_m.inc(st.tokens)
        m.prompt_len_m.observe(len(job.prompt_ids))
        m.output_len_m.observe(st.tokens)
        m.e2e_m.observe(time.perf_counter() - arrival)
        if st.queue_time is not None:
            m.queue_m.observe(st.queue_time)

    async def run(self, jobs: list[PromptJob], arrival: float) -> AsyncIterator[ChoiceEvent]:
        """Every choice's events as they come; an error ends all choices. Events that queued
        up while the consumer was busy (a slow HTTP client) go out merged, one per choice."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(job: PromptJob) -> None:
            try:
                async with contextlib.aclosing(self.prompt(job, arrival)) as events:
                    async for ev in events:
                        queue.put_nowait(ev)
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(done)

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        try:
            remaining = len(tasks)
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                merged: dict[int, ChoiceEvent] = {}
                for item in items:
                    if item is done:
                        remaining -= 1
                    elif isinstance(item, Exception):
                        raise item
                    elif (ev := merged.get(item.index)) is None:
                        merged[item.index] = item
                    else:
                        ev.merge(item)
                for ev in merged.values():
                    yield ev
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


def token_strings(codec: TextCodec | None, ids: list[int]) -> list[str]:
    if codec is None:
        return [f"token_id:{t}" for t in ids]
    return [codec.token_text(t) for t in ids]
