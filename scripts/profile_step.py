"""Step-shape profiler: the device time of a forward with prefill chunks beside decode rows,
against the same work split into its parts, and the kernels it spends that time in.

GPU: a Llama-3.1-8B-shaped model with random bf16 weights. Shapes (``--shapes``, each
``PROMPTS x PROMPT_LEN + DECODE_ROWS @ CONTEXT``) are timed eagerly (CUDA-event median), mixed
ones also with their decode rows through the prefill kernel (``decode_rows = 0``), and decode-only
ones also through CUDA graphs. With ``--nano-batches`` decode-only shapes are also timed split
into two overlapped nano-batches (greenroom.models.nano_batches), eagerly and through graphs
captured with the split, with the ratio to the plain step and the largest logit difference:
``nano_*`` keys for the two-stream schedule, ``nano_attn_stream_*`` for the one with the
attention on a stream of its own. ``--quick``: a tiny shape on CPU (the split runs eagerly there). Prints one JSON
object as its last line; with ``--kernels`` a per-kernel table for each shape on stderr too.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from functools import partial

import torch

from greenroom.bench.roofline import measure_ceilings, prefill_flops
from greenroom.bench.step_breakdown import blocks_needed, kernel_table, step_batch
from greenroom.bench.timing import median_seconds
from greenroom.config import KVConfig, ModelConfig
from greenroom.models.arch import ArchConfig
from greenroom.models.cuda_graphs import DecodeGraphs, partition_sizing
from greenroom.models.loader import random_weights
from greenroom.models.nano_batches import NanoBatches
from greenroom.models.presets import preset_config
from greenroom.models.runner import ModelRunner

SHAPE = re.compile(r"^(\d+)x(\d+)\+(\d+)@(\d+)$")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    m = SHAPE.match(text.replace(" ", ""))
    if m is None:
        raise SystemExit(
            f"shape {text!r}: expected PROMPTS x PROMPT_LEN + DECODE_ROWS @ CONTEXT, e.g. 8x1000+400@1500"
        )
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def host_launch_ms(fn, reps: int = 3) -> float:
    """Median host time to issue ``fn``'s work (the device idle and synchronized before)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_nano_batches(runner, batch, nano, graphs, plain: dict, timed, name: str) -> dict:
    """The decode step split into nano-batches: eager and graph times, their ratios to the
    plain step's, and the largest logit difference from the plain eager forward; keys start
    with ``name``."""
    want = runner.forward(batch, graphs="none").clone()  # rewrites the same KV each call
    runner.model.nano = nano
    try:
        row = {f"{name}_eager_ms": timed(partial(runner.forward, batch, graphs="none"))}
        got = [runner.forward(batch, graphs="none")]
        if graphs is not None and graphs.can_run(batch):
            row[f"{name}_graph_ms"] = timed(partial(graphs.run, batch))
            got.append(graphs.run(batch))
    finally:
        runner.model.nano = None
    row[f"{name}_logits_max_abs_diff"] = max(float((g - want).abs().max()) for g in got)
    row[f"{name}_over_plain_eager"] = row[f"{name}_eager_ms"] / plain["eager_ms"]
    if f"{name}_graph_ms" in row and "graph_ms" in plain:
        row[f"{name}_over_plain_graph"] = row[f"{name}_graph_ms"] / plain["graph_ms"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated shapes, e.g. 8x1000+0@0,8x1000+400@1500,0x0+414@1500",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--kernels", action="store_true", help="per-kernel device time of each shape (stderr)"
    )
    p.add_argument(
        "--nano-batches",
        action="store_true",
        help="decode-only shapes also split into two overlapped nano-batches (A/B in one run)",
    )
    p.add_argument(
        "--nano-blas-sms",
        type=int,
        default=None,
        help="capture the nano-batch graphs with matmuls sized for this many SMs (cuBLASLt "
        "SM target), leaving the rest to the other half's attention",
    )
    args = p.parse_args()
    quick = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if quick else "cuda")
    model = "random:small" if quick else args.model
    default = "2x24+3@40,0x0+4@40" if quick else "8x1000+0@0,8x1000+400@1500,0x0+414@1500"
    shapes = [parse_shape(s) for s in (args.shapes or default).split(",")]
    arch = ArchConfig.from_dict(preset_config(model), source=model)
    dtype = torch.float32 if quick else torch.bfloat16
    ceilings = measure_ceilings(device, dtype)
    tpb = 16
    need = max(blocks_needed(*s, tpb) for s in shapes)
    longest = max(max(s[1], s[3]) for s in shapes)
    rows = max(s[0] + s[2] for s in shapes)
    cfg = ModelConfig(
        max_model_len=max(longest, 64), cuda_graph_max_batch_size=max(1, max(s[2] for s in shapes))
    )
    runner = ModelRunner.from_weights(
        cfg,
        KVConfig(tokens_per_block=tpb, num_blocks=need),
        arch,
        random_weights(arch, dtype, device),
        device,
        model,
    )
    # every decode shape splits: on two streams, and with the attention on a third
    schedules = {"nano": NanoBatches(2), "nano_attn_stream": NanoBatches(2, attention_stream=True)}
    nano_graphs: dict[str, DecodeGraphs] = {}
    if device.type == "cuda":
        decode_sizes = sorted({s[2] for s in shapes if s[0] == 0 and s[2] > 0})
        if decode_sizes:
            runner.capture_cuda_graphs(batch_sizes=decode_sizes)
            for name, nano in schedules.items() if args.nano_batches else ():
                runner.model.nano = nano
                with partition_sizing(args.nano_blas_sms):
                    nano_graphs[name] = DecodeGraphs(
                        runner.model, runner.kv_pool, runner.max_blocks_per_seq, decode_sizes
                    )
                runner.model.nano = None
    kv_per_token = runner.block_bytes // tpb
    out = []
    for prompts, plen, drows, ctx in shapes:
        batch = step_batch(runner, prompts, plen, drows, ctx)
        timed = lambda fn: median_seconds(fn, device, args.reps, 2) * 1e3  # noqa: E731
        row = {
            "shape": f"{prompts}x{plen}+{drows}@{ctx}",
            "rows": batch.num_requests,
            "tokens": batch.num_tokens,
        }
        row["eager_ms"] = timed(partial(runner.forward, batch, graphs="none"))
        row["eager_host_launch_ms"] = host_launch_ms(partial(runner.forward, batch, graphs="none"))
        if batch.decode_rows:
            saved, batch.decode_rows = batch.decode_rows, 0
            row["decode_rows_in_prefill_kernel_ms"] = timed(
                partial(runner.forward, batch, graphs="none")
            )
            batch.decode_rows = saved
        if batch.decode_only and runner.graphs is not None and runner.graphs.can_run(batch):
            row["graph_ms"] = timed(partial(runner.forward, batch))
        for name, nano in schedules.items() if args.nano_batches else ():
            if not nano.splits(batch):
                continue
            graphs = nano_graphs.get(name)
            row.update(time_nano_batches(runner, batch, nano, graphs, row, timed, name))
            if args.kernels and device.type == "cuda":
                runner.model.nano = nano
                row[f"{name}_kernels"] = kernel_table(partial(runner.forward, batch, graphs="none"))
                runner.model.nano = None
                print(json.dumps({"shape": row["shape"], name: row[f"{name}_kernels"]}),
                      file=sys.stderr)  # fmt: skip
        flops = prompts * prefill_flops(arch, plen) if prompts else 0.0
        kv_bytes = drows * ctx * kv_per_token
        row["prefill_matmul_floor_ms"] = flops / ceilings.matmul_flops_per_s * 1e3
        row["decode_kv_read_floor_ms"] = kv_bytes / ceilings.copy_bytes_per_s * 1e3
        if args.kernels and device.type == "cuda":
            row["kernels"] = kernel_table(partial(runner.forward, batch, graphs="none"))
            print(json.dumps({"shape": row["shape"], "kernels": row["kernels"]}), file=sys.stderr)
        out.append(row)
        print(
            f"profile_step: {json.dumps({k: v for k, v in row.items() if k != 'kernels'})}",
            file=sys.stderr,
            flush=True,
        )
    print(
        json.dumps(
            {
                "benchmark": "profile_step",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "model": model,
                "ceilings": ceilings.to_dict(),
                "rows": rows,
                "nano_blas_sms": args.nano_blas_sms,
                "shapes": out,
            }
        )
    )


if __name__ == "__main__":
    main()
