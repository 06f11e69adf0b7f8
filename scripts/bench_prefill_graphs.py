"""Prefill CUDA graphs for the SM-disaggregation context engine: launch cost and GIL theft.

One 8B-shaped model (random bf16 weights) on SM partitions as a node makes them (context /
generation split from ``--context-sm-percent``), decode graphs captured on the generation
stream, prefill graphs on the context stream. Two measurements in one run:

1. Isolated prefill forwards of several batch shapes, eager against graph replay: host time to
   launch (wall until the call returns), GPU time (CUDA events) and the padding's cost.
2. The generation engine's view: decode executor steps (batch ``--decode-batch`` at
   ``--context``-token contexts, sampling and read-back included) on one thread, timed alone,
   beside a thread running back-to-back eager prefills, and beside one replaying prefill
   graphs. The ratio of step wall times is what the context engine costs decoding; eager
   against graph separates its host launches (GIL) from its GPU contention. Then the same
   with decode on every SM (a high-priority stream) instead of the generation partition.

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from greenroom.bus.messages import SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.kernels.sm_partition import choose_sm_split, create_sm_partitions
from greenroom.models.batch import SequenceChunk
from greenroom.models.cuda_graphs import partition_sizing
from greenroom.models.executor import PlanExecutor, Sequence
from greenroom.models.runner import ModelRunner


def prefill_chunks(shape: str, first_block: int, vocab: int) -> list[SequenceChunk]:
    """``"4x128"``: 4 fresh requests of 128 tokens, in consecutive blocks from first_block."""
    n, tokens = (int(x) for x in shape.split("x"))
    blocks = -(-tokens // 16)
    g = torch.Generator().manual_seed(n * 7919 + tokens)
    return [
        SequenceChunk(
            torch.randint(0, vocab, (tokens,), generator=g).tolist(),
            0,
            list(range(first_block + i * blocks, first_block + (i + 1) * blocks)),
        )
        for i in range(n)
    ]


def time_prefill(runner: ModelRunner, chunks, stream, graphs: str, n: int) -> dict:
    host, gpu = [], []
    with torch.cuda.stream(stream):
        for i in range(n + 2):
            batch = runner.build_batch(chunks)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            runner.forward(batch, graphs=graphs)
            t1 = time.perf_counter()
            b.record()
            b.synchronize()
            if i >= 2:
                host.append((t1 - t0) * 1e3)
                gpu.append(a.elapsed_time(b))
    return {
        "launch_ms": round(statistics.median(host), 3),
        "gpu_ms": round(statistics.median(gpu), 3),
    }


def decode_steps(executor: PlanExecutor, stream, batch: int, n: int, it: list[int]) -> list[float]:
    walls = []
    with torch.cuda.stream(stream):
        for _ in range(n):
            it[0] += 1
            plan = StepPlan(iteration=it[0], steps=[SequenceStep(f"r{i}", 1) for i in range(batch)])
            t0 = time.perf_counter()
            executor.execute(plan)
            walls.append((time.perf_counter() - t0) * 1e3)
    return walls


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--context-sm-percent", type=float, default=0.2)
    ap.add_argument("--shapes", default="1x120,4x128,8x120,2x512,1x2048")
    ap.add_argument("--max-num-tokens", type=int, default=2048, help="largest prefill graph")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--busy-shape", default="4x128", help="the prefill the busy thread repeats")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)

    shapes = args.shapes.split(",")
    decode_steps_total = 6 * (args.steps + 5)
    bpr = -(-(args.context + decode_steps_total + 16) // 16)
    prefill_blocks = max(int(s.split("x")[0]) * -(-int(s.split("x")[1]) // 16) for s in shapes)
    first_prefill_block = 1 + args.decode_batch * bpr
    runner = ModelRunner(
        ModelConfig(path=args.model, max_model_len=max(4096, bpr * 16)),
        KVConfig(num_blocks=first_prefill_block + prefill_blocks + 1, enable_prefix_reuse=False),
    )
    runner.kv_pool.normal_(0, 0.5)
    props = torch.cuda.get_device_properties(0)
    ctx_sms, _ = choose_sm_split(props.multi_processor_count, args.context_sm_percent)
    ctx_stream, gen_stream, info = create_sm_partitions(ctx_sms)
    gen_sms = info.generation_sms if info.generation_sms >= 0.75 * info.total_sms else None
    with partition_sizing(gen_sms):
        runner.capture_cuda_graphs(gen_stream, batch_sizes=[args.decode_batch])
    disjoint_graphs = runner.graphs
    # the alternative placement: decode on every SM (a high-priority stream), sharing the
    # context partition's SMs with prefill
    shared_stream = torch.cuda.Stream(priority=-1)
    runner.capture_cuda_graphs(shared_stream, batch_sizes=[args.decode_batch])
    shared_graphs = runner.graphs
    t0 = time.perf_counter()
    sizes = runner.capture_prefill_graphs(ctx_stream, args.max_num_tokens, max_requests=32)
    capture_s = time.perf_counter() - t0
    vocab = runner.vocab_size

    isolated = []
    for shape in shapes:
        chunks = prefill_chunks(shape, first_prefill_block, vocab)
        eager = time_prefill(runner, chunks, ctx_stream, "none", args.repeats)
        graph = time_prefill(runner, chunks, ctx_stream, "prefill", args.repeats)
        row = {
            "shape": shape,
            "eager": eager,
            "graph": graph,
            "launch_ratio": round(graph["launch_ms"] / eager["launch_ms"], 3),
            "gpu_ratio": round(graph["gpu_ms"] / eager["gpu_ms"], 3),
        }
        isolated.append(row)
        print(json.dumps(row), flush=True)

    executor = PlanExecutor(runner, graphs="decode")
    g = torch.Generator().manual_seed(0)
    for i in range(args.decode_batch):
        executor.sequences[f"r{i}"] = Sequence(
            request_id=f"r{i}",
            tokens=torch.randint(0, vocab, (args.context,), generator=g).tolist(),
            num_computed=args.context - 1,
            block_ids=list(range(1 + i * bpr, 1 + (i + 1) * bpr)),
            sampling=SamplingParams(max_tokens=1 << 20),
            seed=i,
            num_output_tokens=0,
        )
    busy_chunks = prefill_chunks(args.busy_shape, first_prefill_block, vocab)
    it = [0]
    concurrent = {}
    runs = [("disjoint", m) for m in ("alone", "eager", "graph", "alone")]
    runs += [("shared", m) for m in ("alone", "graph")]
    for placement, mode in runs:
        runner.graphs = disjoint_graphs if placement == "disjoint" else shared_graphs
        decode_stream = gen_stream if placement == "disjoint" else shared_stream
        stop = threading.Event()
        done = [0]

        def busy(graphs: str, stop: threading.Event, done: list[int]) -> None:
            with torch.cuda.stream(ctx_stream):
                while not stop.is_set():
                    runner.forward(runner.build_batch(busy_chunks), graphs=graphs).argmax(
                        -1
                    ).tolist()
                    done[0] += 1

        thread = None
        if mode != "alone":
            thread = threading.Thread(
                target=busy, args=("none" if mode == "eager" else "prefill", stop, done)
            )
            thread.start()
            time.sleep(0.2)
        decode_steps(executor, decode_stream, args.decode_batch, 5, it)
        t0 = time.perf_counter()
        done[0] = 0
        walls = decode_steps(executor, decode_stream, args.decode_batch, args.steps, it)
        elapsed = time.perf_counter() - t0
        stop.set()
        if thread is not None:
            thread.join()
        key = mode if placement == "disjoint" else f"shared_{mode}"
        key = key if key not in concurrent else f"{key}_after"
        concurrent[key] = {
            "decode_step_ms_mean": round(statistics.fmean(walls), 3),
            "decode_step_ms_p50": round(statistics.median(walls), 3),
            "decode_step_ms_p90": round(sorted(walls)[int(0.9 * len(walls))], 3),
            "prefills_per_s": round(done[0] / elapsed, 1),
        }
        print(key, json.dumps(concurrent[key]), flush=True)
    alone = statistics.fmean(
        [
            concurrent["alone"]["decode_step_ms_mean"],
            concurrent["alone_after"]["decode_step_ms_mean"],
        ]
    )
    return {
        "benchmark": "prefill_graphs",
        "device": props.name,
        "model": args.model,
        "sms": {"context": info.context_sms, "generation": info.generation_sms},
        "prefill_graph_sizes": sizes,
        "capture_s": round(capture_s, 1),
        "isolated": isolated,
        "decode_batch": args.decode_batch,
        "context": args.context,
        "busy_shape": args.busy_shape,
        "concurrent": concurrent,
        "decode_slowdown_eager": round(concurrent["eager"]["decode_step_ms_mean"] / alone, 3),
        "decode_slowdown_graph": round(concurrent["graph"]["decode_step_ms_mean"] / alone, 3),
        # decode on every SM beside prefill on the context partition, against disjoint decode
        "shared_vs_disjoint_alone": round(
            concurrent["shared_alone"]["decode_step_ms_mean"] / alone, 3
        ),
        "shared_vs_disjoint_busy": round(
            concurrent["shared_graph"]["decode_step_ms_mean"]
            / concurrent["graph"]["decode_step_ms_mean"],
            3,
        ),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
