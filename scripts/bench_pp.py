#!/usr/bin/env python
"""Pipeline-parallel benchmark: a node at PP = N against PP = 1 x TP = N (the same device
count), from the stages' own reports: per-stage busy fraction (1 - bubble), stage 0's launch
gap p50/p99, the time from a micro-batch's end on the last stage to the next micro-batch of
its requests starting on stage 0, and output tokens/s. Prints one JSON object as the last line.

Default: ``random:llama-3.2-1b`` on CUDA, PP 2, 64 requests. ``--quick``: the embedded tiny
model on CPU ranks (gloo), PP 2, 8 requests (report only; CPU figures say nothing of GPUs).
"""

from __future__ import annotations

import argparse
import json

import torch

from greenroom.bench.pp import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small CPU smoke run")
    p.add_argument(
        "--model", default="random:llama-3.2-1b", help="checkpoint dir or random:<shape>"
    )
    p.add_argument("--pp-size", type=int, default=2, help="pipeline stages (default: 2)")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per micro-batch")
    args = p.parse_args(argv)
    extra = {}
    if args.quick:
        args.model, device = "", "cpu"
        args.requests, args.prompt_len, args.max_tokens, args.max_batch_size = 8, 16, 8, 2
        extra = {"model": {"cpu_threads": 1}, "kv": {"num_blocks": 64}}
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = run(
        args.model or None,
        device,
        args.pp_size,
        args.requests,
        args.prompt_len,
        args.max_tokens,
        args.max_batch_size,
        extra,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
