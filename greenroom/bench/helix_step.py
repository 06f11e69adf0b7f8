"""Decode step time of a whole model on ``cp`` Helix ranks against one rank, at a long context.

Each rank is a real Helix ``ModelRunner`` (every attention head over its KV shard, the partials
exchanged and merged, o_proj, MLP, embedding and LM head tensor-parallel over the CP group) and
times one eager decode step of ``batch`` requests whose ``ctx - 1`` earlier tokens fill its
pool as the KV manager would place them (block j on rank j mod cp). The baseline is the same
model and batch on one rank. Random weights of a named shape (``random:...``); the KV
contents do not change the work, so the pools stay as allocated.
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch

from greenroom.config import KVConfig, ModelConfig
from greenroom.models.batch import SequenceChunk


def decode_chunks(batch: int, ctx: int, tpb: int, cp: int) -> tuple[list[SequenceChunk], int]:
    """One decode token per request at position ``ctx - 1``, with global block tables over
    ``cp`` pools; and the blocks each pool needs (its null block included)."""
    per_request = -(-ctx // tpb)
    per_rank = -(-per_request // cp)
    blocks_per_rank = 1 + batch * per_rank
    chunks = []
    for i in range(batch):
        table = [
            (j % cp) * blocks_per_rank + 1 + i * per_rank + j // cp for j in range(per_request)
        ]
        chunks.append(SequenceChunk([3 + i], ctx - 1, table))
    return chunks, blocks_per_rank


def _runner(cfg: dict, cp: int, rank: int, device: torch.device, group=None):
    from greenroom.models.runner import ModelRunner
    from greenroom.parallel.comm import TensorParallel

    chunks, blocks = decode_chunks(cfg["step_batch"], cfg["step_context"], cfg["tpb"], cp)
    model_cfg = ModelConfig(device=device.type, cuda_graphs=False)
    kv_cfg = KVConfig(tokens_per_block=cfg["tpb"], num_blocks=blocks)
    tp = TensorParallel(rank, cp, group) if cp > 1 else None
    runner = ModelRunner(model_cfg, kv_cfg, cfg["model"], device, tp=tp, helix=cp > 1)
    return runner, chunks


def time_steps(runner, chunks, reps: int, barrier=None) -> float:
    """Median ms of one decode step (batch built and forward run, as the engine does)."""
    cuda = runner.device.type == "cuda"
    times = []
    for _ in range(reps + 1):  # the first warms up
        if barrier is not None:
            barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.forward(runner.build_batch(chunks))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def join_bench_group(
    rank: int, world: int, port: int, device: str, timeout_s: float
) -> torch.device:
    """Join a benchmark's loopback process group (NCCL on ``cuda``, gloo with one CPU thread
    otherwise) as ``rank``; returns this rank's device."""
    import torch.distributed as dist

    cuda = device == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    return dev


def step_rank(rank: int, cp: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch.distributed as dist

    device = join_bench_group(rank, cp, port, cfg["device"], timeout_s=300)
    try:
        runner, chunks = _runner(cfg, cp, rank, device, dist.group.WORLD)
        ms = time_steps(runner, chunks, cfg["reps"], dist.barrier)
        torch.save(ms, Path(out_dir) / f"step{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_rank_step_ms(cfg: dict) -> float:
    runner, chunks = _runner(cfg, 1, 0, torch.device(cfg["device"]))
    ms = time_steps(runner, chunks, cfg["reps"])
    del runner
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()
    return ms


__all__ = ["decode_chunks", "single_rank_step_ms", "step_rank", "time_steps"]
