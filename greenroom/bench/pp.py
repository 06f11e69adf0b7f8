"""Pipeline-parallel serving measured from the stages' own reports (``parallel.stage_reports``).

One run starts a node in this process, sends ``num_requests`` concurrent greedy requests and
reads back when each stage ran each micro-batch:

- per-stage busy fraction: the stage's compute time over the span from the first micro-batch
  start to the last end on any stage (1 - bubble);
- launch gap: stage 0's idle time between one micro-batch's end and the next one's start,
  while requests were running (how fast the scheduler keeps the pipe fed), p50 / p99;
- result-to-next: from a micro-batch's end on the last stage to the start on stage 0 of the
  next micro-batch that steps any of its requests (the scheduler's turnaround), p50 / p99;
- output tokens/s over the whole run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import build_config
from greenroom.node import Node
from greenroom.parallel import messages as m


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stage_metrics(runs: list[list[float]], plan_requests: dict[str, list[str]], stages: int):
    by_stage: dict[int, list[tuple[int, float, float]]] = {k: [] for k in range(stages)}
    for stage, plan, start, end in runs:
        by_stage[int(stage)].append((int(plan), start, end))
    first = min(r[2] for r in runs)
    last = max(r[3] for r in runs)
    span = max(last - first, 1e-9)
    busy = [sum(e - s for _, s, e in by_stage[k]) / span for k in range(stages)]
    zero = sorted(by_stage[0])
    gaps = [b[1] - a[2] for a, b in zip(zero, zero[1:], strict=False)]
    starts0 = {p: s for p, s, _ in zero}
    ends_last = {p: e for p, _, e in by_stage[stages - 1]}
    next_of: dict[str, int] = {}  # request id -> the plan that stepped it last (walking back)
    turnaround = []
    for plan in sorted(starts0, reverse=True):
        ids = plan_requests.get(str(plan), [])
        following = [next_of[r] for r in ids if r in next_of]
        if following and plan in ends_last:
            turnaround.append(starts0[min(following)] - ends_last[plan])
        for r in ids:
            next_of[r] = plan
    return {
        "stage_busy_fraction": [round(b, 4) for b in busy],
        "bubble_fraction": round(1 - sum(busy) / stages, 4),
        "launch_gap_p50_ms": round(percentile(gaps, 0.5) * 1e3, 3),
        "launch_gap_p99_ms": round(percentile(gaps, 0.99) * 1e3, 3),
        "result_to_next_p50_ms": round(percentile(turnaround, 0.5) * 1e3, 3),
        "result_to_next_p99_ms": round(percentile(turnaround, 0.99) * 1e3, 3),
        "micro_batches": len(zero),
    }


async def serve_once(
    model: str,
    device: str,
    pp_size: int,
    tp_size: int,
    num_requests: int,
    prompt_len: int,
    max_tokens: int,
    max_batch_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = build_config(
        {
            "port": 0,
            "log_level": "warning",
            "log_stats_interval_s": 0,
            "model": {"path": model, "device": device, **(extra or {}).get("model", {})},
            "kv": {"tokens_per_block": 16, **(extra or {}).get("kv", {})},
            "scheduler": {"max_batch_size": max_batch_size, "max_num_tokens": 4096},
            "http": {"enabled": False},
            "parallel": {"pp_size": pp_size, "tp_size": tp_size, "stage_reports": True},
        }
    )
    node = await Node.start(cfg)
    try:
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        vocab = node.info.vocab_size
        prompts = [
            [3 + (i * 7 + j * 13) % (vocab - 3) for j in range(prompt_len)]
            for i in range(num_requests)
        ]
        async with AsyncClient(node.address, timeout=600) as client:
            await client.generate(prompts[0][:8], SamplingParams(max_tokens=2))  # warm-up
            started = time.perf_counter()
            results = await asyncio.gather(*(client.generate(p, sampling) for p in prompts))
            wall = time.perf_counter() - started
        tokens = sum(len(r.token_ids) for r in results)
        out: dict[str, Any] = {
            "output_tokens_per_s": round(tokens / wall, 2),
            "wall_s": round(wall, 3),
        }
        stats = await node.refs["mixed"].ask(m.StageRunsQuery(), timeout=30)
        if stats.runs:
            out |= stage_metrics(stats.runs, stats.plan_requests, pp_size)
        return out
    finally:
        await node.stop()


def run(
    model: str,
    device: str,
    pp_size: int,
    num_requests: int,
    prompt_len: int,
    max_tokens: int,
    max_batch_size: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """PP = ``pp_size`` against PP = 1 with TP = ``pp_size`` (the same device count)."""
    args = (num_requests, prompt_len, max_tokens, max_batch_size, extra)
    pp = asyncio.run(serve_once(model, device, pp_size, 1, *args))
    base = asyncio.run(serve_once(model, device, 1, pp_size, *args))
    return {
        "model": model,
        "device": device,
        "pp_size": pp_size,
        "num_requests": num_requests,
        "pp": pp,
        "baseline_tp": {"output_tokens_per_s": base["output_tokens_per_s"]},
        "tokens_per_s_pp_over_tp": round(
            pp["output_tokens_per_s"] / max(base["output_tokens_per_s"], 1e-9), 3
        ),
        "min_stage_busy_fraction": min(pp.get("stage_busy_fraction", [0.0])),
    }
