"""The choices of one API request: node requests streamed through the client library.

Each choice is one node request; `n` choices run as `n` requests with seeds `seed + i`. Stop
strings are matched here on the detokenized text: the text stops before the stop string and
the node request is aborted (leaving the stream aborts it). Request-level metrics are recorded
as the tokens arrive.
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
from greenroom.http.text import StopMatcher, TextCodec

MAX_N = 128
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class ChoiceJob:
    index: int
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


# sampling fields that map one to one when the node's SamplingParams has them
_OPTIONAL_SAMPLING = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
}


def sampling_params(req: _Common, max_tokens: int, logprobs: int) -> SamplingParams:
    """The node's SamplingParams for one choice of `req` (seed added per choice)."""
    if not 1 <= req.n <= MAX_N:
        raise invalid(f"n = {req.n} is invalid: must be in [1, {MAX_N}]", "n")
    if not 0 <= logprobs <= MAX_LOGPROBS:
        raise invalid(
            f"logprobs = {logprobs} is invalid: must be in [0, {MAX_LOGPROBS}]", "logprobs"
        )
    fields = SamplingParams.__struct_fields__
    extra: dict = {}
    for name, default in _OPTIONAL_SAMPLING.items():
        value = getattr(req, name)
        if value != default:
            if name not in fields:
                raise invalid(f"{name} is not supported by this server yet", name)
            extra[name] = value
    if req.logit_bias:
        if "logit_bias" not in fields:
            raise invalid("logit_bias is not supported by this server yet", "logit_bias")
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
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        **extra,
    )


def choice_jobs(prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[ChoiceJob]:
    """`n` choices per prompt, indexed prompt-major; seeds `seed + i` when a seed is given."""
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            s = sampling
            if n > 1 and sampling.seed is not None:
                s = SamplingParams(**{**_fields(sampling), "seed": sampling.seed + i})
            jobs.append(ChoiceJob(p * n + i, ids, s))
    return jobs


def _fields(s: SamplingParams) -> dict:
    return {f: getattr(s, f) for f in s.__struct_fields__}


class Generation:
    def __init__(self, client: AsyncClient, codec: TextCodec | None, metrics: HttpMetrics):
        self.client = client
        self.codec = codec
        self.metrics = metrics

    async def choice(
        self, job: ChoiceJob, stops: list[str], arrival: float
    ) -> AsyncIterator[ChoiceEvent]:
        m, label = self.metrics, self.metrics.model_name
        detok = self.codec.detokenizer() if self.codec is not None else None
        matcher = StopMatcher(stops)
        first = last = None
        n_out = 0
        finish: str | None = "abort"  # until the stream says otherwise
        queue_time = None
        try:
            async with contextlib.aclosing(
                self.client.stream(job.prompt_ids, job.sampling)
            ) as stream:
                async for delta in stream:
                    now = time.perf_counter()
                    k = len(delta.token_ids)
                    if k:
                        if first is None:
                            first = now
                            m.ttft.labels(label).observe(now - arrival)
                        else:
                            gap = (now - last) / k
                            for _ in range(k):
                                m.itl.labels(label).observe(gap)
                        last = now
                        n_out += k
                    piece = detok.push(list(delta.token_ids)) if detok is not None and k else ""
                    text, stopped = matcher.push(piece)
                    reason = "stop" if stopped else delta.finish_reason
                    if reason is not None and not stopped:
                        text += matcher.flush()
                    cached = 0
                    if delta.metrics is not None:
                        queue_time = delta.metrics.queue_time_s
                        cached = delta.metrics.num_cached_tokens
                    yield ChoiceEvent(
                        job.index, text, list(delta.token_ids), delta.logprobs, reason, cached
                    )
                    if reason is not None:
                        finish = reason
                        break  # on a stop string, leaving the stream aborts the node request
        except GreenroomError as exc:
            finish = None
            m.request_failure.labels(label, exc.kind).inc()
            raise
        finally:
            if finish is not None:
                m.request_success.labels(label, finish).inc()
                m.prompt_tokens.labels(label).inc(len(job.prompt_ids))
                m.generation_tokens.labels(label).inc(n_out)
                m.prompt_len.labels(label).observe(len(job.prompt_ids))
                m.output_len.labels(label).observe(n_out)
                m.e2e.labels(label).observe(time.perf_counter() - arrival)
                if queue_time is not None:
                    m.queue.labels(label).observe(queue_time)

    async def run(
        self, jobs: list[ChoiceJob], stops: list[str], arrival: float
    ) -> AsyncIterator[ChoiceEvent]:
        """Every choice's events, interleaved as they come; an error ends all choices."""
        if len(jobs) == 1:
            async with contextlib.aclosing(self.choice(jobs[0], stops, arrival)) as events:
                async for ev in events:
                    yield ev
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(job: ChoiceJob) -> None:
            try:
                async with contextlib.aclosing(self.choice(job, stops, arrival)) as events:
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
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


def token_strings(codec: TextCodec | None, ids: list[int]) -> list[str]:
    if codec is None:
        return [f"token_id:{t}" for t in ids]
    return [codec.token_text(t) for t in ids]
