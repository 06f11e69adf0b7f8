#!/usr/bin/env python
"""Scheduler CPU time per iteration: SM disaggregation's adaptive routing against mixed mode.

Runs the real SchedulerCore and KV manager with a token-sampling stand-in for the engines
(greenroom/bench/scheduler_cost.py) at several decode batch sizes, both modes in the same
run, and prints one JSON object as its last line: microseconds per iteration per mode and
`adaptive_over_mixed` per batch size (1.0: adaptive routing costs the scheduler nothing
extra).
"""

from __future__ import annotations

import argparse
import json
import platform

from greenroom.bench.scheduler_cost import iteration_cost


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--running", default="16,64,128", help="decoding requests at a time, comma-separated"
    )
    ap.add_argument("--iterations", type=int, default=2000, help="timed iterations per point")
    ap.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.running.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--running {args.running!r} is invalid: integers, e.g. 16,64")
    if not sizes or min(sizes) < 1 or args.iterations < 1:
        ap.error("--running needs sizes >= 1 and --iterations >= 1")
    if args.quick:
        sizes, args.iterations = [8], 200
    rows = []
    for n in sizes:
        mixed = iteration_cost("mixed", n, args.iterations)
        adaptive = iteration_cost("adaptive", n, args.iterations)
        rows.append(
            {
                "running": n,
                "mixed_us": mixed.us_per_iteration,
                "adaptive_us": adaptive.us_per_iteration,
                "mixed_us_p50": mixed.us_per_iteration_p50,
                "adaptive_us_p50": adaptive.us_per_iteration_p50,
                "adaptive_over_mixed": round(adaptive.us_per_iteration / mixed.us_per_iteration, 3),
            }
        )
        print(
            f"running {n:4d}: mixed {mixed.us_per_iteration:7.1f} us  adaptive "
            f"{adaptive.us_per_iteration:7.1f} us per iteration",
            flush=True,
        )
    return {
        "benchmark": "scheduler_cost",
        "python": platform.python_version(),
        "iterations": args.iterations,
        "rows": rows,
        "adaptive_over_mixed_max": max(r["adaptive_over_mixed"] for r in rows),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
