#!/usr/bin/env python
"""Sampling-options benchmark: the sampler's time per decode step for a batch where every row
uses penalties (repetition, presence, frequency), a 16-id logit bias and min_tokens, as a ratio
to the same batch without them (greedy and temperature/top-p). Prints one JSON object as the
last line.

Default: batch 256, vocabulary 128256 (Llama 3), 1024-token prompts, on CUDA if present.
``--quick``: batch 8, vocabulary 4096, on CPU (a few seconds).
"""

from __future__ import annotations

import argparse
import json

import torch

from greenroom.bench.sampling import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small CPU smoke run")
    p.add_argument("--batch", type=int, default=256, help="rows per step (default: 256)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default: 128256)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per row")
    p.add_argument("--reps", type=int, default=50, help="timed steps (median reported)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.vocab, args.prompt_len, args.reps = 8, 4096, 64, 5
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # the engine's CPU sampling runs beside the event loop
    out = run(args.batch, args.vocab, args.prompt_len, device, args.reps, warmup=3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
