#!/usr/bin/env python
"""Helix context-parallel decode benchmark: per-rank KV balance over a run (fullest minus
emptiest rank, in blocks, against decode-on-the-last-rank placement), the all-to-all bytes per
decode step and layer across context lengths (flat: growth 1.0), the decode attention time at
cp N against one rank at the longest context, and a whole model's decode step time at cp N
against one rank at a long context. Prints one JSON object as the last line.

Default: cp 4, batch 8, 32 heads (8 KV heads) of 128, contexts 4k..128k; the step of the
Llama-3.1-8B shape (random weights), batch 2 at 128k; on CUDA if present.
``--quick``: cp 2, small shapes, contexts 256..4096, the step of ``random:small`` at 4096, on
CPU (gloo).
"""

from __future__ import annotations

import argparse
import json

import torch

from greenroom.bench.helix import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small CPU smoke run")
    p.add_argument("--cp-size", type=int, default=4, help="CP ranks (default: 4)")
    p.add_argument("--batch", type=int, default=8, help="requests per decode step")
    p.add_argument("--reps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--requests", type=int, default=64, help="requests of the KV balance run")
    p.add_argument(
        "--step-model",
        default="random:llama-3.1-8b",
        help="the shape whose whole decode step is timed (a random: preset)",
    )
    p.add_argument("--step-batch", type=int, default=2, help="requests in the timed step")
    p.add_argument(
        "--step-context", type=int, default=131072, help="tokens of each request in that step"
    )
    args = p.parse_args(argv)
    if args.cp_size < 1:
        p.error(f"--cp-size {args.cp_size} is invalid: must be >= 1")
    cuda = torch.cuda.is_available() and not args.quick
    if cuda and torch.cuda.device_count() < args.cp_size:
        p.error(f"--cp-size {args.cp_size} needs that many GPUs: {torch.cuda.device_count()} seen")
    cfg = dict(
        device="cuda" if cuda else "cpu",
        batch=args.batch,
        heads=32,
        kv_heads=8,
        dim=128,
        tpb=64,
        contexts=[4096, 16384, 65536, 131072],
        reps=args.reps,
        model=args.step_model,
        step_batch=args.step_batch,
        step_context=args.step_context,
    )
    if args.quick:
        args.cp_size, args.requests = 2, 12
        cfg |= dict(batch=2, heads=8, kv_heads=2, dim=32, tpb=16, contexts=[256, 1024, 4096])
        cfg |= dict(reps=3, model="random:small", step_batch=2, step_context=4096)
    print(json.dumps(run(args.cp_size, cfg, args.requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
