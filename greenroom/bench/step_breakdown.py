"""Where one forward's device time goes: steps of a given shape (prefill chunks beside decode
rows), timed with CUDA events and split into kernels by the torch profiler."""

from __future__ import annotations

from collections.abc import Callable

import torch

from greenroom.models.batch import ForwardBatch, SequenceChunk
from greenroom.models.runner import ModelRunner


def blocks_needed(prompts: int, prompt_len: int, decode_rows: int, context: int, tpb: int) -> int:
    """Pool blocks (the null block included) for ``step_batch`` with these arguments."""
    return 1 + prompts * -(-prompt_len // tpb) + decode_rows * -(-context // tpb)


def step_batch(
    runner: ModelRunner, prompts: int, prompt_len: int, decode_rows: int, context: int
) -> ForwardBatch:
    """``decode_rows`` one-token rows at ``context`` (first, as the scheduler orders them),
    then ``prompts`` whole prompts of ``prompt_len`` tokens; every row has its own blocks."""
    tpb = runner.tokens_per_block
    chunks, next_block = [], 1

    def take(tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-tokens // tpb)
        next_block += n
        return list(range(next_block - n, next_block))

    for i in range(decode_rows):
        chunks.append(SequenceChunk([7 + i % 100], context - 1, take(context)))
    for i in range(prompts):
        tokens = [(11 * i + j) % 1000 + 3 for j in range(prompt_len)]
        chunks.append(SequenceChunk(tokens, 0, take(prompt_len)))
    return runner.build_batch(chunks)


def kernel_table(fn: Callable[[], object], top: int = 12) -> list[dict]:
    """The ``top`` kernels of one call of ``fn`` by device time: name, calls, total ms."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "cuda_time_total", 0.0)
        if device_us > 0:
            rows.append({"kernel": e.key[:90], "calls": e.count, "ms": round(device_us / 1e3, 3)})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


__all__ = ["blocks_needed", "kernel_table", "step_batch"]
