"""The prompt length from which prefill is compute-bound: measured where generation steps run.

A prefill step reads every weight once whatever its length, so up to some number of tokens
its time barely grows (memory-bound: a short prompt pays a whole weight read); past it the
matmuls dominate and the time grows linearly with the tokens (compute-bound). Adaptive SM
disaggregation sends prompts from that knee on to the context engine and lets shorter ones
ride in the generation step. ``knee_tokens`` finds the knee in a ladder of timings (pure);
``measure_compute_bound_tokens`` times the ladder on a runner, on a given stream.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# a step of the ladder is linear when its time grows at least this fast with the tokens
# (the log-log slope: 1.0 is exactly linear, ~0 is a flat weight read)
LINEAR_SLOPE = 0.8
GPU_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CPU_LADDER = (8, 16, 32, 64)


def knee_tokens(sizes: Sequence[int], times: Sequence[float], linear: float = LINEAR_SLOPE) -> int:
    """The chunk size from which step time grows ~linearly with tokens.

    ``sizes`` ascending, ``times`` the step time at each. The knee lies in the first interval
    from which every later interval is linear (log-log slope >= ``linear``); inside it, the
    point where the flat floor (the time at the smallest size) meets the line through the
    linear part. Every interval linear: the smallest size (everything measured is
    compute-bound); none: twice the largest (nothing measured is).
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("knee_tokens needs at least two (size, time) pairs of equal count")
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] < 1:
        raise ValueError(f"sizes {list(sizes)} must be positive and strictly ascending")
    if min(times) <= 0:
        raise ValueError("times must be positive")
    slopes = [
        math.log(times[i + 1] / times[i]) / math.log(sizes[i + 1] / sizes[i])
        for i in range(len(sizes) - 1)
    ]
    start = len(slopes)
    while start > 0 and slopes[start - 1] >= linear:
        start -= 1
    if start == len(slopes):
        return 2 * sizes[-1]
    if start == 0:
        return sizes[0]
    # the line through the linear part's ends meets the floor somewhere in [sizes[start - 1],
    # sizes[start]] on a roofline; noise can put it outside, so clamp
    per_token = (times[-1] - times[start]) / (sizes[-1] - sizes[start])
    offset = times[start] - per_token * sizes[start]
    lo, hi = sizes[start - 1], sizes[start]
    if per_token <= 0:
        return hi
    meet = (times[0] - offset) / per_token
    return int(round(min(hi, max(lo, meet))))


@dataclass
class KneeMeasurement:
    """The ladder measured and the knee found in it (logged at start)."""

    tokens: int
    sizes: list[int] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def measure_compute_bound_tokens(
    runner: Any,
    stream: Any = None,
    max_tokens: int = 4096,
    repeats: int = 3,
) -> KneeMeasurement:
    """Time one fresh prompt's prefill at each ladder size (up to ``max_tokens``, the context
    budget) on ``stream``, the median of ``repeats``; stops once two intervals in a row are
    linear. Writes KV only into blocks no request holds yet (the node has not started)."""
    import torch

    cuda = runner.device.type == "cuda"
    ladder = [n for n in (GPU_LADDER if cuda else CPU_LADDER) if n <= max_tokens]
    if len(ladder) < 2:
        ladder = [max(1, max_tokens // 2), max_tokens]
    tpb = runner.tokens_per_block
    usable = (runner.num_blocks - 1) * tpb  # block 0 is the null block
    ladder = [n for n in ladder if n <= min(usable, runner.max_model_len - 1)]
    if len(ladder) < 2:
        raise ValueError(
            f"the KV pool ({usable} tokens) or max_model_len ({runner.max_model_len}) is too "
            "small to measure sm_disagg.routing_threshold_tokens: set it in the config"
        )
    t0 = time.perf_counter()
    sizes, step_ms = [], []
    ctx = torch.cuda.stream(stream) if cuda and stream is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode(), _one_cpu_thread(not cuda):
        for n in ladder:
            step_ms.append(_time_prefill(runner, n, repeats, cuda))
            sizes.append(n)
            if len(sizes) >= 3 and all(
                math.log(step_ms[i + 1] / step_ms[i]) / math.log(sizes[i + 1] / sizes[i])
                >= LINEAR_SLOPE
                for i in (len(sizes) - 3, len(sizes) - 2)
            ):
                break
    return KneeMeasurement(
        knee_tokens(sizes, step_ms),
        sizes,
        [round(t, 3) for t in step_ms],
        round(time.perf_counter() - t0, 3),
    )


@contextlib.contextmanager
def _one_cpu_thread(on: bool):
    """CPU: time on one intra-op thread; on a busy host, threads spinning at barriers turn a
    millisecond forward into hundreds (measured on 2 shared cores)."""
    import torch

    before = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on:
            torch.set_num_threads(before)


def _time_prefill(runner: Any, n: int, repeats: int, cuda: bool) -> float:
    import torch

    from greenroom.models.batch import SequenceChunk

    blocks = list(range(1, 1 + -(-n // runner.tokens_per_block)))
    chunk = SequenceChunk([(7 * i + 3) % runner.vocab_size for i in range(n)], 0, blocks)
    times = []
    for i in range(repeats + 1):  # the first run warms up (kernel choice, allocator)
        batch = runner.build_batch([chunk])
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            runner.forward(batch, graphs="prefill")
            b.record()
            b.synchronize()
            elapsed = a.elapsed_time(b)
        else:
            start = time.perf_counter()
            runner.forward(batch, graphs="none")
            elapsed = (time.perf_counter() - start) * 1e3
        if i:
            times.append(elapsed)
    return max(statistics.median(times), 1e-6)


__all__ = ["KneeMeasurement", "knee_tokens", "measure_compute_bound_tokens"]
