#!/usr/bin/env python
"""Prefix-reuse benchmark: replay the Mooncake trace against a node with (a) no reuse,
(b) GPU-only reuse and (c) GPU reuse plus a host tier sized to hold the working set.

Reports each mode's block hit rate against the ideal hit rate of an unbounded cache over the
same prompts (computed in this run), TTFT p50/p99, prefill tokens computed and the scheduler's
count of plans over ``max_num_tokens``. On CUDA it also measures host-tier onboarding: the
engine's onboard copies of a batch of 8B-layout blocks vs one plain pinned host-to-device copy
of the same bytes. Prints one JSON object as the last line.

``--quick``: the embedded tiny model on CPU, every 16th conversation, each 512-token hash block
mapped to 8 tokens (one KV block of 8), prompts capped at 256 tokens, outputs at 4, arrivals
compressed 100x (< 120 s). ``--modes ""`` with ``--copies on`` measures only the copies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from greenroom.replay.bundled import MOONCAKE, bundled_trace

DEFAULT_TRACE = bundled_trace(MOONCAKE)  # 290 rows; pass the full public trace for real runs

QUICK = {
    "tokens_per_hash_block": 8,
    "tokens_per_block": 8,
    "conversation_stride": 16,
    "max_input_len": 256,
    "max_output_len": 4,
    "time_scale": 0.01,
    "max_num_tokens": 512,
    "max_requests": 300,  # a cap for traces the conversation stride does not thin
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "trace",
        nargs="?",
        default=DEFAULT_TRACE,
        help="Mooncake JSONL trace (default: the bundled 290-row slice; the full trace is "
        "FAST25-release/traces/synthetic_trace.jsonl of github.com/kvcache-ai/Mooncake)",
    )
    p.add_argument("--quick", action="store_true", help="small CPU run (see above)")
    p.add_argument("--model", default=None, help="model.path (default: embedded tiny model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--tokens-per-hash-block",
        type=int,
        default=512,
        help="tokens behind each 512-token trace block; input lengths scale by the same factor",
    )
    p.add_argument(
        "--conversation-stride",
        type=int,
        default=1,
        help="keep the conversations whose first hash id is a multiple of this",
    )
    p.add_argument("--max-requests", type=int, default=None, help="first N requests kept")
    p.add_argument("--max-input-len", type=int, default=None, help="cap prompts (tokens)")
    p.add_argument("--max-output-len", type=int, default=None, help="cap outputs (tokens)")
    p.add_argument("--max-model-len", type=int, default=0, help="model.max_model_len (0: model's)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies arrival times")
    p.add_argument("--tokens-per-block", type=int, default=16)
    p.add_argument("--max-num-tokens", type=int, default=8192, help="scheduler token budget")
    p.add_argument(
        "--gpu-blocks",
        type=int,
        default=-1,
        help="GPU pool blocks for every mode (-1: --gpu-fraction of the working set; "
        "0: sized from device memory)",
    )
    p.add_argument("--gpu-fraction", type=float, default=0.1)
    p.add_argument(
        "--host-blocks", type=int, default=0, help="host tier blocks (0: the working set + 10%%)"
    )
    p.add_argument("--modes", default="no_reuse,gpu_reuse,host_tier")
    p.add_argument(
        "--copies",
        choices=("auto", "on", "off"),
        default="auto",
        help="measure onboarding copy bandwidth (auto: on CUDA only)",
    )
    p.add_argument("--out", default=None, help="directory for per-mode report JSON files")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra node config override for every mode, e.g. model.cuda_graphs=false",
    )
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    return p.parse_args(argv)


def block_overrides(args, max_request_blocks: int, working_set: int) -> tuple[int, int]:
    """(GPU pool blocks, host tier blocks); the pool keeps room for 4 of the largest requests."""
    gpu = args.gpu_blocks
    if gpu < 0:
        gpu = max(int(working_set * args.gpu_fraction), 4 * max_request_blocks) + 1
    host = args.host_blocks or int(working_set * 1.1) + 1
    return gpu, host


async def run(args) -> dict:
    import torch

    from greenroom.bench.prefix import (
        MODES,
        ideal_hits,
        kept_hash_blocks,
        mode_overrides,
        mode_summary,
        run_mode,
        scaled_requests,
        select_conversations,
        trace_ideal_hits,
    )
    from greenroom.config import parse_override
    from greenroom.models.arch import ArchConfig
    from greenroom.models.presets import is_preset, preset_config
    from greenroom.models.tiny import tiny_llama_dir
    from greenroom.replay.readers import read_rows

    copies = {}
    want_copies = args.copies == "on" or (args.copies == "auto" and torch.cuda.is_available())
    if want_copies and args.device != "cpu":
        from greenroom.bench.prefix_copies import onboard_bandwidth

        measured = onboard_bandwidth(device="cuda" if torch.cuda.is_available() else "cpu")
        print(f"onboard copies: {json.dumps(measured)}", file=sys.stderr, flush=True)
        copies = {
            "onboard_copies": measured,
            "onboard_of_pinned_h2d": measured["min_onboard_of_plain"],
        }
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: {m!r} is not one of {MODES}")
    source = args.model or str(tiny_llama_dir())
    arch = (
        ArchConfig.from_dict(preset_config(source))
        if is_preset(source)
        else ArchConfig.from_dir(source)
    )
    max_model_len = args.max_model_len or arch.max_position_embeddings
    all_rows = read_rows(args.trace, "mooncake")
    rows = select_conversations(all_rows, args.conversation_stride)[: args.max_requests]
    requests = scaled_requests(
        rows,
        vocab_size=arch.vocab_size,
        tokens_per_hash_block=args.tokens_per_hash_block,
        max_model_len=max_model_len,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
    )
    tpb = args.tokens_per_block
    ideal = ideal_hits((r.prompt_token_ids for r in requests), tpb)
    by_index = sorted(requests, key=lambda r: r.index)
    kept = [kept_hash_blocks(r, args.tokens_per_hash_block) for r in by_index]
    trace_rows, trace_all = trace_ideal_hits(rows, kept), trace_ideal_hits(all_rows)
    max_request_blocks = max(-(-(r.prompt_length + r.max_tokens) // tpb) for r in requests)
    gpu_blocks, host_blocks = block_overrides(args, max_request_blocks, ideal.distinct_blocks)
    base = {
        "model.path": args.model,
        "model.device": args.device,
        "model.max_model_len": args.max_model_len,
        "kv.tokens_per_block": tpb,
        "scheduler.max_num_tokens": args.max_num_tokens,
        "log_level": "warning",
        **dict(parse_override(item) for item in args.set),
    }
    results, reports = {}, {}
    for mode in modes:
        overrides = {**base, **mode_overrides(mode, gpu_blocks, host_blocks)}
        report = await run_mode(overrides, requests, time_scale=args.time_scale)
        reports[mode] = report
        results[mode] = mode_summary(report, args.max_num_tokens, ideal)
        print(f"{mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for mode, report in reports.items():
            (out / f"prefix_{mode}.json").write_text(report.to_json(indent=2) + "\n")

    baseline = results.get("no_reuse", {}).get("prefill_tokens")
    for r in results.values():
        r["prefill_tokens_of_no_reuse"] = (
            round(r["prefill_tokens"] / baseline, 4) if baseline else None
        )
    summary = {
        "bench": "prefix",
        "trace": Path(args.trace).name,
        "model": args.model or "tiny",
        "device": next(iter(reports.values())).run["device"] if reports else None,
        "requests": len(requests),
        "prompt_tokens": int(sum(r.prompt_length for r in requests)),
        "tokens_per_hash_block": args.tokens_per_hash_block,
        "conversation_stride": args.conversation_stride,
        "time_scale": args.time_scale,
        "tokens_per_block": tpb,
        "gpu_blocks": gpu_blocks,
        "host_blocks": host_blocks,
        "working_set_blocks": ideal.distinct_blocks,
        "ideal_hit_rate": round(ideal.rate, 4),
        "trace_ideal_hit_rate": round(trace_rows.rate, 4),
        "trace_ideal_hit_rate_whole_file": round(trace_all.rate, 4),
        "modes": results,
    }
    host = results.get("host_tier")
    summary["host_tier_hit_rate_of_ideal"] = host["hit_rate_of_ideal"] if host else None
    summary["plans_over_budget"] = sum(r["plans_over_budget"] for r in results.values())
    summary["failed"] = sum(r["failed"] for r in results.values())
    # a benchmark that lost requests says so: its ratios cover fewer requests than it sent
    summary["lost_requests"] = summary["failed"]
    summary["complete"] = summary["failed"] == 0
    summary.update(copies)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(summary))
    if summary["lost_requests"]:
        print(
            f"bench_prefix: {summary['lost_requests']} requests failed; see 'modes'",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    from greenroom.logging import configure_logging

    configure_logging("console", "warning", stream=sys.stderr)  # stdout: the JSON line only
    sys.exit(main())
