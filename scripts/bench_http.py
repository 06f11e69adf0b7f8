"""HTTP API benchmark: output tokens/s and TTFT p50 of HTTP streaming (POST /v1/completions,
SSE) against the native client, on one `greenroom serve` node, at 64 and 256 concurrent
streams in the same run. Targets on a GPU: >= 0.95 of native tokens/s and <= 2 ms added TTFT p50.

GPU (default when CUDA is present): --model (a checkpoint directory or random:NAME preset)
with 512-token prompts and 256 output tokens. --quick: the embedded tiny model on CPU with
short prompts and outputs (a smoke run). Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from greenroom.bench.http import ServedNode, compare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="CPU smoke run on the tiny model")
    p.add_argument("--model", default=None, help="checkpoint directory or random:NAME")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--http-workers", type=int, default=1)
    p.add_argument("--set", action="append", default=[], help="node config override KEY=VALUE")
    args = p.parse_args(argv)
    prompt_len = args.prompt_len or (16 if args.quick else 512)
    max_tokens = args.max_tokens or (16 if args.quick else 256)
    serve_args = ["--http-workers", str(args.http_workers)]
    if args.quick:
        serve_args += ["--device", "cpu", "--num-blocks", "2048"]
    if args.model:
        serve_args += ["--model", args.model]
    for item in args.set:
        serve_args += ["--set", item]
    node = ServedNode(serve_args)
    try:
        from greenroom.client import Client

        with Client(node.address, timeout=60) as c:
            info = c.server_info()
        results = asyncio.run(
            compare(node, args.concurrency, prompt_len, max_tokens, info.vocab_size)
        )
    finally:
        node.stop()
    for c, r in results.items():
        print(
            f"{c:>4} streams: native {r['native']['tokens_per_s']:9.1f} tok/s "
            f"ttft p50 {r['native']['ttft_p50_ms']:8.2f} ms | http {r['http']['tokens_per_s']:9.1f} "
            f"tok/s ttft p50 {r['http']['ttft_p50_ms']:8.2f} ms | ratio "
            f"{r['tokens_per_s_ratio']:.3f} added ttft {r['added_ttft_p50_ms']:+.2f} ms",
            file=sys.stderr,
        )
    summary = {
        "bench": "http",
        "device": info.device,
        "model": info.model_name,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "http_workers": args.http_workers,
        "concurrency": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
