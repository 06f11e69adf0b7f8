"""Tensor-parallel benchmark pieces: one measuring process per rank, and the node run.

Each rank (spawned, joined through a TCPStore of the caller) measures, on the same model
slices and in the same run:

- the decode step (``batch`` requests, one token each, ``context`` tokens of context) and a
  prefill chunk of ``prefill_tokens`` tokens: median forward time;
- every all-reduce inside an eager decode step, timed alone (synchronised on each side), and a
  bare ``torch.distributed.all_reduce`` of the same shape and dtype: median seconds each, so
  their ratio is the all-reduce efficiency inside the step;
- a bare TP decode loop (PlanExecutor over the same plans as the node's), tokens/s.

``tp_size = 1`` runs the same code in one process without a process group.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from greenroom.bench.serve import DecodeWorkload, bare_decode
from greenroom.bench.timing import median_seconds
from greenroom.config import KVConfig, ModelConfig
from greenroom.models.batch import ForwardBatch, SequenceChunk
from greenroom.parallel.comm import TensorParallel


@dataclass(frozen=True)
class TPBenchConfig:
    model: str  # a random:NAME preset or a checkpoint directory
    device: str  # cpu | cuda
    dtype: str
    batch: int
    context: int
    prefill_tokens: int
    reps: int
    warmup: int
    work: DecodeWorkload
    num_blocks: int
    timeout_s: float = 300.0


class TimedTP(TensorParallel):
    """A TensorParallel whose all-reduces are timed one by one (synchronised both sides)."""

    def __init__(self, tp: TensorParallel, device: torch.device) -> None:
        object.__setattr__(self, "rank", tp.rank)
        object.__setattr__(self, "size", tp.size)
        object.__setattr__(self, "group", tp.group)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "times", [])
        object.__setattr__(self, "shapes", [])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        t0 = time.perf_counter()
        out = super().all_reduce(x)
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)
        self.shapes.append(tuple(x.shape))
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_batch(runner, cfg: TPBenchConfig) -> ForwardBatch:
    tpb = runner.tokens_per_block
    per = -(-cfg.context // tpb)
    chunks = [
        SequenceChunk([7], cfg.context - 1, list(range(1 + i * per, 1 + (i + 1) * per)))
        for i in range(cfg.batch)
    ]
    return runner.build_batch(chunks)


def _prefill_batch(runner, cfg: TPBenchConfig) -> ForwardBatch:
    tpb = runner.tokens_per_block
    blocks = list(range(1, 1 + -(-cfg.prefill_tokens // tpb)))
    return runner.build_batch([SequenceChunk([5] * cfg.prefill_tokens, 0, blocks)])


def measure_rank(cfg: TPBenchConfig, tp: TensorParallel, device: torch.device) -> dict:
    """Every per-rank figure (see the module docstring) on this rank."""
    from greenroom.models.executor import PlanExecutor
    from greenroom.models.runner import ModelRunner

    model_cfg = ModelConfig(path=cfg.model, dtype=cfg.dtype)
    runner = ModelRunner(model_cfg, KVConfig(num_blocks=cfg.num_blocks), None, device, tp=tp)
    if device.type == "cuda":
        runner.capture_cuda_graphs(batch_sizes=[cfg.batch])  # graphs capture the collectives
    decode, prefill = _decode_batch(runner, cfg), _prefill_batch(runner, cfg)
    with torch.inference_mode():
        decode_s = median_seconds(lambda: runner.forward(decode), device, cfg.reps, cfg.warmup)
        prefill_s = median_seconds(lambda: runner.forward(prefill), device, cfg.reps, cfg.warmup)
        out = {"decode_step_s": decode_s, "prefill_s": prefill_s}
        if tp.size > 1:
            out |= _all_reduce_figures(runner, decode, cfg, tp, device)
    executor = PlanExecutor(runner)
    prompts = cfg.work.prompts(runner.vocab_size)
    out["bare_loop_tokens_per_s"] = bare_decode(executor, prompts, cfg.work).tokens_per_s
    return out


def _all_reduce_figures(runner, decode, cfg, tp, device) -> dict:
    import torch.distributed as dist

    timed = TimedTP(tp, device)
    model = runner.model
    model.tp = timed
    try:
        for _ in range(cfg.reps):
            model.forward(decode, runner.kv_pool)
    finally:
        model.tp = tp
    shape = (cfg.batch, runner.arch.hidden_size)
    in_step = [t for t, s in zip(timed.times, timed.shapes, strict=True) if s == shape]
    x = torch.randn(shape, dtype=runner.dtype, device=device)

    def bare() -> None:
        dist.all_reduce(x, group=tp.group)

    bare_s = median_seconds(bare, device, max(cfg.reps, 5) * 4, cfg.warmup)
    nbytes = x.numel() * x.element_size()
    step_s = statistics.median(in_step)
    return {
        "all_reduce_bytes": nbytes,
        "all_reduce_in_step_s": step_s,
        "all_reduce_bare_s": bare_s,
        "all_reduces_per_step": len(in_step) // cfg.reps,
    }


def _rank_main(rank: int, size: int, port: int, cfg: TPBenchConfig, out) -> None:
    from greenroom.models.cpu_threads import available_cores
    from greenroom.parallel.groups import init_rank_groups
    from greenroom.parallel.layout import RankLayout

    try:
        device = torch.device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (available_cores() - 1) // size))  # as the node's ranks
        tp = TensorParallel.single()
        groups = None
        if size > 1:
            groups = init_rank_groups(
                RankLayout(tp_size=size), rank, "127.0.0.1", port, 1, device, cfg.timeout_s
            )
            tp = groups.tp
        result = measure_rank(cfg, tp, device)
        if rank == 0:
            out.put(("ok", result))
        if groups is not None:
            groups.destroy()
    except Exception as exc:  # report, so the caller fails with the reason and not a timeout
        out.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def run_ranks(cfg: TPBenchConfig, size: int) -> dict:
    """Rank 0's figures with ``size`` ranks (one spawned process per rank)."""
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=cfg.timeout_s),
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, size, store.port, cfg, out)) for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        status, value = out.get(timeout=cfg.timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(value)
    return value


async def served_rate(cfg: TPBenchConfig, size: int) -> float:
    """Decode tokens/s of a TP node on the same workload (the node's own ranks)."""
    from greenroom.bench.serve import served_decode
    from greenroom.client import AsyncClient
    from greenroom.config import load_config
    from greenroom.node import Node

    node_cfg = load_config(
        overrides={
            "port": 0,
            "log_level": "warning",
            "model.path": cfg.model,
            "model.dtype": cfg.dtype,
            "model.device": cfg.device,
            "kv.num_blocks": cfg.num_blocks,
            "parallel.tp_size": size,
            "scheduler.max_batch_size": cfg.work.num_requests,
        }
    )
    node = await Node.start(node_cfg)
    try:
        async with AsyncClient(node.address, timeout=cfg.timeout_s) as client:
            info = await client.server_info()
            prompts = cfg.work.prompts(info.vocab_size)
            return (await served_decode(client, prompts, cfg.work)).tokens_per_s
    finally:
        await node.stop()


def summary(cfg: TPBenchConfig, size: int, one: dict, many: dict, served: float) -> dict:
    return {
        "tp_size": size,
        "device": cfg.device,
        "model": cfg.model,
        "config": {k: v for k, v in asdict(cfg).items() if k != "work"}
        | {"work": asdict(cfg.work)},
        "decode_step_ms": {
            "tp1": one["decode_step_s"] * 1e3,
            f"tp{size}": many["decode_step_s"] * 1e3,
        },
        "decode_speedup_vs_tp1": one["decode_step_s"] / many["decode_step_s"],
        "prefill_ms": {"tp1": one["prefill_s"] * 1e3, f"tp{size}": many["prefill_s"] * 1e3},
        "prefill_speedup_vs_tp1": one["prefill_s"] / many["prefill_s"],
        "all_reduce": {
            "bytes": many["all_reduce_bytes"],
            "per_decode_step": many["all_reduces_per_step"],
            "in_step_us": many["all_reduce_in_step_s"] * 1e6,
            "bare_us": many["all_reduce_bare_s"] * 1e6,
            "in_step_bandwidth_vs_bare": many["all_reduce_bare_s"] / many["all_reduce_in_step_s"],
        },
        "serving": {
            "node_tokens_per_s": served,
            "bare_tp_loop_tokens_per_s": many["bare_loop_tokens_per_s"],
            "node_vs_bare_tp_loop": served / many["bare_loop_tokens_per_s"],
        },
    }
