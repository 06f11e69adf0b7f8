"""Serving-path measurements: runtime overhead against a bare runner loop, a trace load sweep
and an offline request set, all against a running node.

The overhead pair runs one decode workload twice: ``bare_decode`` calls
``PlanExecutor.execute`` directly with hand-built plans; ``served_decode`` sends the same
prompts through ``AsyncClient`` streams to a node. Both report steady-state decode tokens/s
(prefill and the first decode steps left out).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.client import AsyncClient
from greenroom.models.executor import PlanExecutor
from greenroom.replay import ReplayReport, TraceRequest, replay
from greenroom.replay.tokens import request_tokens


@dataclass(frozen=True)
class DecodeWorkload:
    """``num_requests`` requests of ``prompt_len`` tokens that each generate ``max_tokens``;
    the first ``warmup_tokens`` of each request's output are left out of the measurement."""

    num_requests: int
    prompt_len: int
    max_tokens: int
    warmup_tokens: int

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        """Private prompts (no shared prefix, so the prefix cache cannot help either side)."""
        return [
            request_tokens(i, self.prompt_len, vocab_size, seed).tolist()
            for i in range(self.num_requests)
        ]

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)


@dataclass(frozen=True)
class DecodeRate:
    tokens_per_s: float
    tokens: int  # output tokens inside the measured window
    seconds: float
    batch: int  # requests decoding in every step of the window
    # mean ms per phase of the measured steps (bare loop: PlanExecutor's step timeline)
    timeline: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- bare loop


def _blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


def bare_plans(
    executor: PlanExecutor,
    prompts: list[list[int]],
    work: DecodeWorkload,
    max_num_tokens: int,
) -> tuple[list[StepPlan], list[StepPlan]]:
    """Prefill plans (whole prompts under ``max_num_tokens``) and one decode plan per step.

    Blocks are handed out as the node's KV manager does: the prompt's blocks with the prompt,
    then one more block in the step whose token first needs it.
    """
    tpb = executor.runner.tokens_per_block
    per_request = _blocks_for(work.prompt_len + work.max_tokens, tpb)
    need = 1 + per_request * len(prompts)
    if need > executor.runner.num_blocks:
        raise ValueError(
            f"the workload needs {need} KV blocks; the runner has {executor.runner.num_blocks}"
        )
    reserved = {
        f"bare-{i}": list(range(1 + i * per_request, 1 + (i + 1) * per_request))
        for i in range(len(prompts))
    }
    held = {rid: _blocks_for(len(p), tpb) for rid, p in zip(reserved, prompts, strict=True)}
    prefill: list[StepPlan] = []
    new: list[NewSequence] = []
    steps: list[SequenceStep] = []
    used = 0
    for (rid, blocks), prompt in zip(reserved.items(), prompts, strict=True):
        if steps and used + len(prompt) > max_num_tokens:
            prefill.append(StepPlan(iteration=len(prefill), new=new, steps=steps))
            new, steps, used = [], [], 0
        new.append(
            NewSequence(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=work.sampling(),
                num_cached_tokens=0,
                block_ids=blocks[: held[rid]],
            )
        )
        steps.append(SequenceStep(rid, len(prompt)))
        used += len(prompt)
    prefill.append(StepPlan(iteration=len(prefill), new=new, steps=steps))
    decode: list[StepPlan] = []
    for k in range(1, work.max_tokens):  # the prefill samples the first token
        decode_steps = []
        for rid, prompt in zip(reserved, prompts, strict=True):
            want = _blocks_for(len(prompt) + k, tpb)
            grow = reserved[rid][held[rid] : want]
            held[rid] = max(held[rid], want)
            decode_steps.append(SequenceStep(rid, 1, grow))
        decode.append(StepPlan(iteration=len(prefill) + len(decode), steps=decode_steps))
    return prefill, decode


def _sync(executor: PlanExecutor) -> None:
    if executor.runner.device.type == "cuda":
        torch.cuda.synchronize(executor.runner.device)


def run_plans(executor: PlanExecutor, plans: list[StepPlan], overlap: bool) -> list[dict]:
    """Run ``plans`` in order; with ``overlap`` each is launched before the previous one's
    tokens are read, as the node's engine does. Returns each step's host timeline."""
    timelines = []
    if not overlap:
        for plan in plans:
            executor.execute(plan)
            timelines.append(executor.last_timing)
        return timelines
    previous = None
    for plan in plans:
        launched = executor.launch(plan)
        if previous is not None:
            executor.finish(previous)
            timelines.append(executor.last_timing)
        previous = launched
    if previous is not None:
        executor.finish(previous)
        timelines.append(executor.last_timing)
    return timelines


def mean_timeline(timelines: list[dict]) -> dict[str, float]:
    rows = [t for t in timelines if t]
    if not rows:
        return {}
    return {k: sum(t[k] for t in rows) / len(rows) for k in rows[0]}


def bare_decode(
    executor: PlanExecutor,
    prompts: list[list[int]],
    work: DecodeWorkload,
    max_num_tokens: int = 8192,
    overlap: bool = True,
) -> DecodeRate:
    """Prefill every prompt, then decode all requests together, one plan per step; time the
    steps after ``warmup_tokens``. The plans are built before the clock starts. ``overlap``:
    launch each plan before reading the previous one's tokens (the engine's default)."""
    first = len(executor.sequences)
    prefill, decode = bare_plans(executor, prompts, work, max_num_tokens)
    ids = [s.request_id for p in prefill for s in p.steps]
    decode_steps = len(decode)
    warm = min(work.warmup_tokens, decode_steps - 1)
    run_plans(executor, prefill + decode[:warm], overlap)
    _sync(executor)
    started = time.perf_counter()
    timelines = run_plans(executor, decode[warm:], overlap)
    _sync(executor)
    seconds = time.perf_counter() - started
    executor.execute(StepPlan(iteration=len(prefill) + decode_steps, finished=ids))
    if len(executor.sequences) != first:
        raise RuntimeError("the bare loop left sequences behind in the executor")
    tokens = len(ids) * (decode_steps - warm)
    return DecodeRate(tokens / seconds, tokens, seconds, len(ids), mean_timeline(timelines))


# --------------------------------------------------------------------------- through a node


def steady_window(
    arrivals: Sequence[Sequence[tuple[float, int]]], warmup_tokens: int
) -> DecodeRate:
    """Decode rate while every request is decoding.

    ``arrivals[i]`` lists (time, tokens) of each delta of request i. The window opens when the
    last request to start has received ``1 + warmup_tokens`` tokens and closes when the first
    request receives its final delta; tokens arriving inside (open, close] are counted.
    """
    if not arrivals or any(not a for a in arrivals):
        raise ValueError("every request needs at least one delta")
    opens = []
    for deltas in arrivals:
        total, opened = 0, None
        for t, k in deltas:
            total += k
            if total >= 1 + warmup_tokens:
                opened = t
                break
        if opened is None:
            raise ValueError(
                f"a request produced fewer than 1 + warmup_tokens = {1 + warmup_tokens} tokens"
            )
        opens.append(opened)
    start = max(opens)
    end = min(d[-1][0] for d in arrivals)
    if end <= start:
        raise ValueError(
            "no steady decode window: the first request finished before the last one warmed "
            "up (raise max_tokens or lower warmup_tokens)"
        )
    tokens = sum(k for deltas in arrivals for t, k in deltas if start < t <= end)
    return DecodeRate(tokens / (end - start), tokens, end - start, len(arrivals))


async def served_decode(
    client: AsyncClient, prompts: list[list[int]], work: DecodeWorkload, tag: str = "decode"
) -> DecodeRate:
    """Send every prompt at once as a stream; the steady decode rate seen by the client."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]
    sampling = work.sampling()

    async def one(i: int) -> None:
        out = arrivals[i]
        async for delta in client.stream(prompts[i], sampling, request_id=f"{tag}-{i}"):
            if delta.token_ids:
                out.append((time.perf_counter(), len(delta.token_ids)))

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    produced = [sum(k for _, k in a) for a in arrivals]
    if any(n != work.max_tokens for n in produced):
        raise RuntimeError(
            f"requests produced {sorted(set(produced))} tokens, not {work.max_tokens}"
        )
    return steady_window(arrivals, work.warmup_tokens)


# --------------------------------------------------------------------------- load sweep


def sweep_row(load: float, requests: Sequence[TraceRequest], report: ReplayReport) -> dict:
    """One load point: offered rate, achieved throughput and tail latencies (ms)."""
    span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    return {
        "load": load,
        "offered_requests_per_s": len(requests) / (span / load) if span > 0 else None,
        "num_sent": report.num_sent,
        "num_completed": report.num_completed,
        "num_failed": report.num_failed,
        "duration_s": report.duration_s,
        "requests_per_s": report.request_throughput,
        "output_tokens_per_s": report.output_throughput,
        "input_tokens_per_s": report.input_throughput,
        "ttft_ms_p50": report.ttft_ms.p50,
        "ttft_ms_p99": report.ttft_ms.p99,
        "tpot_ms_p50": report.tpot_ms.p50,
        "tpot_ms_p99": report.tpot_ms.p99,
        "preemptions": report.prefix.preemptions,
    }


async def load_sweep(
    client: AsyncClient,
    request_sets: Sequence[Sequence[TraceRequest]],
    loads: Sequence[float],
) -> list[dict]:
    """Replay ``request_sets[i]`` at ``loads[i]`` times its recorded arrival rate (one set per
    load, with its own prompts, so no load reuses the KV of the one before)."""
    rows = []
    for load, requests in zip(loads, request_sets, strict=True):
        report = await replay(requests, client, time_scale=1.0 / load)
        rows.append(sweep_row(load, requests, report))
    return rows


async def offline_throughput(client: AsyncClient, requests: Sequence[TraceRequest]) -> dict:
    """Every request sent at once; output tokens/s from the first send to the last token."""
    report = await replay(requests, client, time_scale=0.0)
    if report.num_failed:
        raise RuntimeError(f"{report.num_failed} requests failed: {report.failures}")
    return {
        "num_requests": report.num_completed,
        "output_tokens": report.total_output_tokens,
        "seconds": report.duration_s,
        "output_tokens_per_s": report.output_throughput,
        "ttft_ms_p50": report.ttft_ms.p50,
        "tpot_ms_p50": report.tpot_ms.p50,
    }


__all__ = [
    "DecodeRate",
    "DecodeWorkload",
    "bare_decode",
    "bare_plans",
    "load_sweep",
    "mean_timeline",
    "offline_throughput",
    "run_plans",
    "served_decode",
    "steady_window",
    "sweep_row",
]
