"""Tensor-parallel benchmark: collectives in the step, scaling against tp 1, serving overhead.

All in one run, on one model (random weights of a preset shape):

(a) all-reduce inside the decode step (each call timed alone, synchronised) against a bare
    torch.distributed all-reduce of the same size: their bandwidth ratio;
(b) decode step and prefill chunk time at tp N against tp 1: the speed-ups;
(c) a TP node (frontend, scheduler, KV manager, rank workers) driven by client streams against
    a bare TP loop running the same plans on the ranks: the ratio of decode tokens/s.

GPU (default with >= N CUDA devices): NCCL, the Llama-3.1-8B shape in bf16, decode graphs that
capture the collectives. --quick: the small preset on CPU ranks (gloo), tiny shapes. Prints
one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import torch

from greenroom.bench.serve import DecodeWorkload
from greenroom.bench.tp import TPBenchConfig, run_ranks, served_rate, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size N (default: 2)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run (gloo, tiny shapes)")
    p.add_argument("--model", default=None, help="random:NAME preset or checkpoint directory")
    p.add_argument("--batch", type=int, default=None, help="decode batch")
    p.add_argument("--context", type=int, default=None, help="context tokens per decode row")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill chunk tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gpu = not args.quick and torch.cuda.device_count() >= args.tp
    if not args.quick and not gpu:
        print(f"needs {args.tp} CUDA devices (or --quick for a CPU run)", file=sys.stderr)
        return 2
    if gpu:
        cfg = TPBenchConfig(
            model=args.model or "random:llama-3.1-8b",
            device="cuda",
            dtype="bfloat16",
            batch=args.batch or 64,
            context=args.context or 2048,
            prefill_tokens=args.prefill_tokens or 4096,
            reps=20,
            warmup=5,
            work=DecodeWorkload(num_requests=64, prompt_len=1024, max_tokens=96, warmup_tokens=16),
            num_blocks=0,
        )
    else:
        cfg = TPBenchConfig(
            model=args.model or "random:small",
            device="cpu",
            dtype="float32",
            batch=args.batch or 8,
            context=args.context or 128,
            prefill_tokens=args.prefill_tokens or 128,
            reps=5,
            warmup=2,
            work=DecodeWorkload(num_requests=4, prompt_len=32, max_tokens=16, warmup_tokens=3),
            num_blocks=128,
        )
    one = run_ranks(cfg, 1)
    many = run_ranks(cfg, args.tp)
    served = asyncio.run(served_rate(cfg, args.tp))
    result = summary(cfg, args.tp, one, many, served)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
