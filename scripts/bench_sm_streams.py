"""Decode-step cost by stream placement: the default stream against green-context partitions.

Isolates what SM-level disaggregation costs a decode step before any scheduling: one 8B-shaped
model (random bf16 weights), batches of 16 and 64 requests at a 2k-token context, decode graphs
captured per placement, and per placement (1) the bare graph replay timed with CUDA events and
(2) a whole executor step (batch build, input copies, replay, sampling, read-back) timed by
wall clock, its forward also by events, so host overhead = wall - forward. Placements: the
default stream (mixed mode), a green context of all SMs, and of 108 and 68 SMs, each captured
unsized (launch shapes for the whole device), with split-K attention sized for the partition,
and with cuBLASLt sized too (`partition_sizing`). Rounds alternate the
placements, so the spread between rounds is the noise. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from greenroom.bus.messages import SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.kernels.sm_partition import _check, create_sm_partitions
from greenroom.models.cuda_graphs import DecodeGraphs, partition_sizing
from greenroom.models.executor import PlanExecutor, Sequence
from greenroom.models.runner import ModelRunner


def whole_device_green_stream(device: int = 0) -> torch.cuda.ExternalStream:
    """A stream on a green context holding every SM (the green-context path, no partition)."""
    from cuda.bindings import driver

    dev = _check(driver.cuDeviceGet(device), "cuDeviceGet")
    whole = _check(
        driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
        "cuDeviceGetDevResource",
    )
    desc = _check(driver.cuDevResourceGenerateDesc([whole], 1), "cuDevResourceGenerateDesc")
    green = _check(
        driver.cuGreenCtxCreate(
            desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        ),
        "cuGreenCtxCreate",
    )
    stream = _check(
        driver.cuGreenCtxStreamCreate(green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
        "cuGreenCtxStreamCreate",
    )
    return torch.cuda.ExternalStream(int(stream), device=torch.device("cuda", device))


Placement = tuple[object, int | None, bool]


def placements(total_sms: int, keep: list) -> dict[str, Placement]:
    """name -> (stream to replay on, None for the default stream; SMs the capture is sized
    for, None for the whole device; whether cuBLASLt is sized too)."""
    out: dict[str, Placement] = {"default": (None, None, False)}
    out[f"green{total_sms}"] = (whole_device_green_stream(), None, False)
    for ctx_sms in (24, 64):
        _, gen, info = create_sm_partitions(ctx_sms)
        keep.append(info)
        n = info.generation_sms
        out[f"green{n}_unsized"] = (gen, None, False)
        out[f"green{n}_splitk"] = (gen, n, False)
        out[f"green{n}_sized"] = (gen, n, True)
    return out


def make_sequences(executor: PlanExecutor, batch: int, context: int, blocks_per_seq: int) -> None:
    vocab = executor.runner.vocab_size
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        tokens = torch.randint(0, vocab, (context,), generator=g).tolist()
        first = 1 + i * blocks_per_seq
        executor.sequences[f"r{i}"] = Sequence(
            request_id=f"r{i}",
            tokens=tokens,
            num_computed=context - 1,
            block_ids=list(range(first, first + blocks_per_seq)),
            sampling=SamplingParams(max_tokens=1 << 20),
            seed=i,
            num_output_tokens=0,
        )


def time_replays(graphs: DecodeGraphs, size: int, stream, n: int) -> float:
    """Median ms of one graph replay (events around each of ``n`` replays)."""
    times = []
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(None)
    with ctx:
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs.graphs[size].replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def time_steps(executor: PlanExecutor, batch: int, stream, n: int, it: list[int]) -> dict:
    """Median wall ms of ``n`` executor decode steps, and of their forwards by events."""
    walls, gpus = [], []
    executor.time_forwards = True
    for _ in range(n):
        it[0] += 1
        plan = StepPlan(iteration=it[0], steps=[SequenceStep(f"r{i}", 1) for i in range(batch)])
        t0 = time.perf_counter()
        if stream is not None:
            with torch.cuda.stream(stream):
                executor.execute(plan)
        else:
            executor.execute(plan)
        walls.append((time.perf_counter() - t0) * 1e3)
        a, b = executor.forward_events
        gpus.append(a.elapsed_time(b))
    wall, gpu = statistics.median(walls), statistics.median(gpus)
    return {
        "step_wall_ms": round(wall, 3),
        "forward_gpu_ms": round(gpu, 3),
        "host_ms": round(wall - gpu, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    bmax = max(batches)
    steps_total = args.rounds * 2 * (args.steps + 3) * len(batches)
    blocks_per_seq = -(-(args.context + steps_total + 16) // 16)
    runner = ModelRunner(
        ModelConfig(
            path=args.model, max_model_len=args.context + steps_total + 64, cuda_graphs=False
        ),
        KVConfig(num_blocks=bmax * blocks_per_seq + 1, enable_prefix_reuse=False),
    )
    runner.kv_pool.normal_(0, 0.5)
    props = torch.cuda.get_device_properties(0)
    keep: list = []
    places = placements(props.multi_processor_count, keep)
    graphs, executors = {}, {}
    for name, (stream, num_sms, blas) in places.items():
        with partition_sizing(num_sms, blas):
            graphs[name] = DecodeGraphs(
                runner.model, runner.kv_pool, runner.max_blocks_per_seq, batches, stream
            )
        runner.graphs = graphs[name]
        ex = PlanExecutor(runner, graphs="decode")
        make_sequences(ex, bmax, args.context, blocks_per_seq)
        executors[name] = ex
    it = [0]
    rows: dict[str, dict[int, list[dict]]] = {n: {b: [] for b in batches} for n in places}
    for _ in range(args.rounds):
        for name, (stream, _, _) in places.items():
            runner.graphs = graphs[name]
            for b in batches:
                time_steps(executors[name], b, stream, 3, it)  # warm up
                rep = time_replays(graphs[name], b, stream, args.replays)
                row = {
                    "replay_ms": round(rep, 3),
                    **time_steps(executors[name], b, stream, args.steps, it),
                }
                rows[name][b].append(row)
    table = []
    for name in places:
        for b in batches:
            rs = rows[name][b]
            table.append(
                {
                    "placement": name,
                    "batch": b,
                    **{k: round(statistics.fmean(r[k] for r in rs), 3) for k in rs[0]},
                    "replay_ms_rounds": [r["replay_ms"] for r in rs],
                    "step_wall_ms_rounds": [r["step_wall_ms"] for r in rs],
                }
            )
    for r in table:
        print(
            f"{r['placement']:22s} B={r['batch']:3d} replay {r['replay_ms']:.3f} ms  step wall "
            f"{r['step_wall_ms']:.3f}  forward {r['forward_gpu_ms']:.3f}  host {r['host_ms']:.3f}  "
            f"rounds {r['replay_ms_rounds']} {r['step_wall_ms_rounds']}",
            flush=True,
        )
    base = {r["batch"]: r for r in table if r["placement"] == "default"}
    for r in table:
        r["replay_vs_default"] = round(r["replay_ms"] / base[r["batch"]]["replay_ms"], 3)
        r["step_vs_default"] = round(r["step_wall_ms"] / base[r["batch"]]["step_wall_ms"], 3)
    return {
        "benchmark": "sm_streams",
        "device": props.name,
        "sms": props.multi_processor_count,
        "model": args.model,
        "context": args.context,
        "rows": table,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
