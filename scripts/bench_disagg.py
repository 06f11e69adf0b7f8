#!/usr/bin/env python
"""Disaggregated serving benchmark: (a) KV transfer through NIXL against a local copy of the
same bytes, (b) one context + one generation node against two mixed nodes on the same replayed
trace slice.

(a) For requests of 1k, 4k and 16k tokens: a child process holds the context side's KV pool
(registered once with its NIXL agent), this process reads the request's blocks into its own
pool through NIXL (UCX); the baseline copies the same blocks between two pools of this process
in the same memory kind. Reported per size: GB/s with contiguous runs merged into one
descriptor, GB/s with one descriptor per block, the copy's GB/s, and the ratio (merged / copy).

(b) The bundled Azure conversation slice, replayed once against a router with 1 context and 1
generation node, once against 2 mixed nodes (each request to the one with fewer in flight):
goodput at an SLO on TTFT and TPOT, TTFT and ITL p99.

``--quick``: CPU DRAM, the embedded tiny model's KV shape for (a) and 40 requests (prompts capped
at 128 tokens, outputs at 8) for (b). Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from greenroom.bench.disagg import PoolShape, run_compare, transfer_bandwidth
from greenroom.models.arch import ArchConfig
from greenroom.replay.bundled import AZURE_CONV, bundled_trace


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small CPU run (see above)")
    p.add_argument(
        "--model",
        default="random:llama-3.1-8b",
        help="the KV shape for (a): a random: preset or a checkpoint directory",
    )
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="pool memory for (a)")
    p.add_argument("--tokens", default="1024,4096,16384", help="request sizes for (a)")
    p.add_argument("--tokens-per-block", type=int, default=16)
    p.add_argument("--run-blocks", type=int, default=8, help="blocks per contiguous run")
    p.add_argument("--requests", type=int, default=None, help="trace requests for (b)")
    p.add_argument("--time-scale", type=float, default=None, help="arrival-time scale for (b)")
    p.add_argument("--max-input-len", type=int, default=None)
    p.add_argument("--max-output-len", type=int, default=None)
    p.add_argument("--slo", default=None, help="goodput SLO in ms, e.g. ttft=2000,tpot=200")
    p.add_argument("--skip-serving", action="store_true", help="only (a)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


FULL = {
    "device": "cpu",
    "requests": 200,
    "time_scale": 0.05,
    "max_input_len": 1024,
    "max_output_len": 64,
    "slo": "ttft=2000,tpot=200",
}
QUICK = {
    "device": "cpu",
    "requests": 40,
    "time_scale": 0.02,
    "max_input_len": 128,
    "max_output_len": 8,
    "slo": "ttft=5000,tpot=1000",
}


def kv_shape(model: str, tokens_per_block: int, quick: bool) -> PoolShape:
    if quick:
        from greenroom.models.tiny import TINY_CONFIG

        return PoolShape.of(ArchConfig.from_dict(TINY_CONFIG), tokens_per_block, torch.float32)
    from greenroom.models.presets import is_preset, preset_config

    arch = (
        ArchConfig.from_dict(preset_config(model))
        if is_preset(model)
        else ArchConfig.from_dir(model)
    )
    return PoolShape.of(arch, tokens_per_block, torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = kv_shape(args.model, args.tokens_per_block, args.quick)
    sizes = [int(t) for t in args.tokens.split(",")]
    transfers = transfer_bandwidth(shape, sizes, args.device, run_blocks=args.run_blocks)
    for t in transfers:
        print(
            f"{t.tokens:>6} tokens {t.bytes / 2**20:8.1f} MiB  NIXL {t.nixl_gbps:7.2f} GB/s "
            f"({t.descriptors} descriptors; {t.nixl_per_block_gbps:.2f} GB/s one per block)  "
            f"copy {t.copy_gbps:7.2f} GB/s  ratio {t.ratio:.2f}",
            file=sys.stderr,
        )
    out = {
        "bench": "disagg",
        "device": args.device,
        "kv_bytes_per_token": shape.bytes_per_token,
        "transfer": [t.to_dict() for t in transfers],
        "transfer_ratio_min": min(t.ratio for t in transfers),
    }
    if not args.skip_serving:
        from greenroom.replay import load_trace
        from greenroom.replay.metrics import parse_slo

        requests = load_trace(
            bundled_trace(AZURE_CONV),
            vocab_size=512 if args.quick else 32000,
            max_requests=args.requests,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
        )
        overrides = {"log_level": "warning", "kv.tokens_per_block": args.tokens_per_block}
        if args.quick:
            overrides.update({"kv.num_blocks": 512, "scheduler.max_num_tokens": 256})
        serving = run_compare(overrides, requests, parse_slo(args.slo), args.time_scale)
        d, m = serving["context_generation"], serving["mixed_x2"]
        if d["goodput_rps"] and m["goodput_rps"]:
            serving["goodput_ratio"] = d["goodput_rps"] / m["goodput_rps"]
        out["serving"] = serving
        out["slo"] = args.slo
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
