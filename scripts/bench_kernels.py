"""Kernel benchmarks against physical limits and baselines measured in the same run.

- decode: paged decode attention bytes/s over the device's measured copy bandwidth
  (read + write counted), Llama-3.1-8B heads (32 q, 8 kv, dim 128), batch x context grid.
- prefill: paged prefill attention TFLOP/s over torch SDPA (flash backend) on the equivalent
  dense causal problem.
- decode_window / prefill_window: the same under a sliding window (greenroom.bench.
  window_attention): decode at 32k context must read only the window (bytes per token, and
  the bandwidth the time would imply if it read the whole context).
- sm_partition: a decode-like GEMM alone, beside prefill GEMMs on a shared GPU, and beside them
  with disjoint green-context SM partitions.

On CPU the torch references run on tiny shapes (the Triton kernels need a GPU there);
``--quick`` is the smallest smoke run. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from greenroom.bench.window_attention import (
    AttentionShape,
    windowed_decode_rows,
    windowed_prefill_rows,
)
from greenroom.kernels import reference

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench(fn: Callable[[], object], device: torch.device, rep_ms: int = 100) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    nbytes = (2 << 30) if device.type == "cuda" else (16 << 20) if quick else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


class Pool:
    """One layer-major KV pool (random bf16) big enough for the largest case, reused by all."""

    def __init__(self, max_tokens: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = max_tokens // PAGE + 1
        shape = (self.num_blocks, 1, 2, PAGE, HKV, HEAD_DIM)
        self.pool = torch.empty(shape, dtype=dtype, device=device).normal_()
        self.k_cache, self.v_cache = self.pool[:, 0, 0], self.pool[:, 0, 1]
        self.device = device

    def tables(self, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_req = -(-context // PAGE)
        blocks = torch.randperm(self.num_blocks - 1, device=self.device)[: batch * per_req] + 1
        tables = blocks.view(batch, per_req).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        return tables, lens


def decode_sweep(args, device, dtype, copy_bw, impl) -> list[dict]:
    pool = Pool(max(b * c for b in args.batches for c in args.contexts), dtype, device)
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            tables, lens = pool.tables(batch, context)
            q = torch.randn(batch, HQ, HEAD_DIM, device=device, dtype=dtype)
            kv_bytes = batch * context * 2 * HKV * HEAD_DIM * pool.pool.element_size()
            io_bytes = kv_bytes + 2 * q.numel() * q.element_size()

            run = partial(impl, q, pool.k_cache, pool.v_cache, tables, lens, HEAD_DIM**-0.5)
            seconds = bench(run, device)
            row = dict(
                batch=batch, context=context, us=seconds * 1e6, GBps=io_bytes / seconds / 1e9
            )
            row["ratio"] = io_bytes / seconds / copy_bw
            if args.tune and device.type == "cuda" and batch >= 16 and context >= 1024:
                row |= tune_decode(run, io_bytes, copy_bw, device, batch)
            rows.append(row)
            log(f"decode B={batch:4d} ctx={context:6d} {row['us']:9.1f} us {row['GBps']:8.1f} GB/s "
                f"ratio {row['ratio']:.3f}" + (f" best {row['best_ratio']:.3f} {row['best']}" if "best" in row else ""))  # fmt: skip
    return rows


DECODE_CONFIGS = [
    (32, 4, 2),
    (64, 4, 2),
    (64, 4, 3),
    (64, 8, 3),
    (128, 4, 2),
    (128, 8, 3),
    (32, 4, 4),
    (32, 2, 4),
    (64, 4, 4),
    (128, 4, 3),
]


def tune_decode(run, io_bytes, copy_bw, device, batch) -> dict:
    from greenroom.kernels.triton_decode_attention import choose_num_splits

    base = choose_num_splits(batch, HKV, 1 << 30, device)
    best: tuple[float, str] = (0.0, "")
    for (block_n, warps, stages), first in itertools.product(DECODE_CONFIGS, (0, 1)):
        for splits in sorted({max(1, base // 2), base, base * 2}):
            call = partial(
                run, splits, block_n=block_n, num_warps=warps, num_stages=stages, heads_first=first
            )
            seconds = bench(call, device, 30)
            ratio = io_bytes / seconds / copy_bw
            name = f"n{block_n}w{warps}s{stages}x{splits}" + ("h" if first else "")
            best = max(best, (ratio, name))
    return {"best_ratio": best[0], "best": best[1]}


PREFILL_CONFIGS = [
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 4),
]


def prefill_sweep(args, device, dtype, impl) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for batch, new, prefix in args.prefill:
        context = prefix + new
        pool = Pool(batch * context + PAGE * batch, dtype, device)
        tables, lens = pool.tables(batch, context)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * new
        q = torch.randn(batch * new, HQ, HEAD_DIM, device=device, dtype=dtype)
        flops = 4 * HQ * HEAD_DIM * batch * sum(prefix + i + 1 for i in range(new))

        run = partial(impl, q, pool.k_cache, pool.v_cache, tables, cu, lens, HEAD_DIM**-0.5, new)
        seconds = bench(run, device)
        row = dict(
            batch=batch, new=new, prefix=prefix, us=seconds * 1e6, TFLOPs=flops / seconds / 1e12
        )
        if prefix == 0:
            dq = torch.randn(batch, HQ, new, HEAD_DIM, device=device, dtype=dtype)
            dk, dv = torch.randn_like(dq), torch.randn_like(dq)
            backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
            with sdpa_kernel(backend):
                sdpa_call = partial(
                    torch.nn.functional.scaled_dot_product_attention, dq, dk, dv, is_causal=True
                )
                sdpa = bench(sdpa_call, device)
            row |= dict(sdpa_TFLOPs=flops / sdpa / 1e12, ratio=sdpa / seconds)
        if args.tune and device.type == "cuda":
            best = (0.0, "")
            for bm, bn, warps, stages in PREFILL_CONFIGS:
                call = partial(run, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
                s = bench(call, device, 50)
                best = max(best, (flops / s / 1e12, f"m{bm}n{bn}w{warps}s{stages}"))
            row |= dict(best_TFLOPs=best[0], best=best[1])
        rows.append(row)
        log(f"prefill B={batch} new={new} prefix={prefix}: {row['TFLOPs']:.1f} TFLOP/s"
            + (f" sdpa {row['sdpa_TFLOPs']:.1f} ratio {row['ratio']:.3f}" if "ratio" in row else "")
            + (f" best {row['best_TFLOPs']:.1f} {row['best']}" if "best" in row else ""))  # fmt: skip
        del pool
    return rows


def sm_partition_interference(device: torch.device, context_percent: float) -> dict:
    """Decode GEMM time alone, beside prefill GEMMs (shared SMs), and with an SM split."""
    from greenroom.kernels.sm_partition import choose_sm_split, create_sm_partitions

    total = torch.cuda.get_device_properties(device).multi_processor_count
    ctx_sms, _ = choose_sm_split(total, context_percent)
    ctx_stream, gen_stream, info = create_sm_partitions(ctx_sms, device)
    dt = torch.bfloat16
    w_dec = torch.randn(4096, 14336, device=device, dtype=dt)
    x_dec = torch.randn(64, 4096, device=device, dtype=dt)
    w_pre = torch.randn(4096, 14336, device=device, dtype=dt)
    x_pre = torch.randn(8192, 4096, device=device, dtype=dt)
    y_dec = torch.empty(64, 14336, device=device, dtype=dt)
    y_pre = torch.empty(8192, 14336, device=device, dtype=dt)
    prefill_flops = 2 * 8192 * 4096 * 14336

    def measure(dec_stream, pre_stream, n_dec=60, n_pre=40) -> tuple[float, float | None]:
        torch.cuda.synchronize()
        pre_start, pre_end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        if pre_stream is not None:
            with torch.cuda.stream(pre_stream):
                pre_start.record(pre_stream)
                for _ in range(n_pre):
                    torch.matmul(x_pre, w_pre, out=y_pre)
                pre_end.record(pre_stream)
        events = []
        with torch.cuda.stream(dec_stream):
            for _ in range(n_dec):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record(dec_stream)
                torch.matmul(x_dec, w_dec, out=y_dec)
                end.record(dec_stream)
                events.append((start, end))
        torch.cuda.synchronize()
        dec_us = (
            statistics.median(s.elapsed_time(e) * 1e3 for s, e in events[5:]) if events else 0.0
        )
        pre_tflops = None
        if pre_stream is not None:
            pre_tflops = n_pre * prefill_flops / (pre_start.elapsed_time(pre_end) / 1e3) / 1e12
        return dec_us, pre_tflops

    plain_dec, plain_pre = torch.cuda.Stream(device), torch.cuda.Stream(device)
    measure(plain_dec, plain_pre)  # warm-up: cuBLAS handles and kernels on every stream
    measure(gen_stream, ctx_stream)
    alone, _ = measure(plain_dec, None)
    alone_gen, _ = measure(gen_stream, None)
    _, prefill_alone = measure(plain_dec, plain_pre, n_dec=0)
    shared, shared_pre = measure(plain_dec, plain_pre)
    split, split_pre = measure(gen_stream, ctx_stream)
    torch.cuda.synchronize()
    info.destroy()
    result = dict(
        total_sms=total,
        context_sms=info.context_sms,
        generation_sms=info.generation_sms,
        decode_gemm="[64x4096]@[4096x14336] bf16",
        prefill_gemm="[8192x4096]@[4096x14336] bf16",
        decode_alone_us=alone,
        decode_alone_on_generation_part_us=alone_gen,
        decode_beside_prefill_shared_us=shared,
        decode_beside_prefill_partitioned_us=split,
        prefill_alone_TFLOPs=prefill_alone,
        prefill_beside_decode_shared_TFLOPs=shared_pre,
        prefill_beside_decode_partitioned_TFLOPs=split_pre,
    )
    log("sm_partition " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--tune", action="store_true", help="also sweep kernel launch configs")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["decode", "prefill", "decode_window", "prefill_window", "sm_partition"],
    )
    parser.add_argument(
        "--window", type=int, help="sliding window of the windowed cases (default 4096 on GPU)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--context-percent", type=float, default=0.73)
    parser.add_argument("--json-out", help="also write the JSON result to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    big = gpu and not args.quick
    args.batches = args.batches or ([1, 16, 64, 256] if big else [1] if args.quick else [1, 4])
    args.contexts = args.contexts or (
        [1024, 4096, 16384, 32768] if big else [256] if args.quick else [256, 1024]
    )
    # (batch, new tokens, cached prefix)
    args.prefill = (
        [(1, 8192, 0), (4, 2048, 0), (16, 512, 0), (2, 2048, 4096)]
        if big
        else [(1, 64 if args.quick else 256, 0)]
    )
    window = args.window or (4096 if big else 64)
    # (batch, context, window) and (batch, new tokens, cached prefix, window)
    args.decode_window = (
        [(1, 32768, window), (16, 32768, window), (64, 32768, window)]
        if big
        else [(2, 4 * window, window)]
    )
    args.prefill_window = (
        [(1, 8192, 0, window), (2, 2048, 30720, window)] if big else [(1, 2 * window, 0, window)]
    )
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        from greenroom.kernels.triton_decode_attention import paged_decode_attention as decode
        from greenroom.kernels.triton_prefill_attention import paged_prefill_attention as prefill
    else:
        decode, prefill = reference.paged_decode_attention, reference.paged_prefill_attention

    result: dict = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "kernels": "triton" if gpu else "torch reference",
        "quick": args.quick,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if gpu:
        result["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
        result["versions"] = {
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        }
    copy_bw = copy_bandwidth(device, args.quick)
    result["copy_GBps"] = copy_bw / 1e9
    log(f"{result['device']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    if "decode" not in args.skip:
        rows = decode_sweep(args, device, dtype, copy_bw, decode)
        target = [r["ratio"] for r in rows if r["batch"] >= 16 and r["context"] >= 4096]
        result["decode"] = rows
        result["decode_min_ratio_b16_ctx4k"] = min(target) if target else None
    if "prefill" not in args.skip:
        rows = prefill_sweep(args, device, dtype, prefill)
        result["prefill"] = rows
        ratios = [r["ratio"] for r in rows if "ratio" in r]
        result["prefill_min_ratio_vs_sdpa"] = min(ratios) if ratios else None
    shape = AttentionShape(HQ, HKV, HEAD_DIM, PAGE)
    timer = partial(bench, device=device)
    if "decode_window" not in args.skip:
        rows = windowed_decode_rows(
            decode, timer, copy_bw, shape, args.decode_window, dtype, device
        )
        for r in rows:
            log(f"decode window={r['window']} B={r['batch']} ctx={r['context']}: {r['us']:.1f} us, "
                f"{r['kv_bytes_per_token'] / 2**20:.2f} MiB/token read, ratio {r['ratio']:.3f} "
                f"(whole context would be {r['ratio_if_whole_context_read']:.2f}), "
                f"{r['time_vs_full_attention_over_window']:.2f}x full attention over the window")  # fmt: skip
        result["decode_window"] = rows
    if "prefill_window" not in args.skip:
        rows = windowed_prefill_rows(prefill, timer, shape, args.prefill_window, dtype, device)
        for r in rows:
            log(f"prefill window={r['window']} B={r['batch']} new={r['new']} "
                f"prefix={r['prefix']}: {r['TFLOPs']:.1f} TFLOP/s, ratio {r['ratio']:.3f}")  # fmt: skip
        result["prefill_window"] = rows
    if gpu and not args.quick and "sm_partition" not in args.skip:
        try:
            result["sm_partition"] = sm_partition_interference(device, args.context_percent)
        except (RuntimeError, ImportError) as exc:
            result["sm_partition"] = {"error": str(exc)}
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
