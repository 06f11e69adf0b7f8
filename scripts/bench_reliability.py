"""Chaos suite: faults against real nodes (tiny model, loopback), bystanders checked against a
clean run. Scenarios: engine kill -9 mid-stream, clients vanishing mid-stream, clients aborting
half their requests, 10x overload, wire fuzz (random, truncated, wrong-schema and oversized
frames, id collisions, foreign aborts), poison sampling values, id reuse after abort and after
error, a slow reader, and kill -9 of the server with clients streaming.

Prints a table (one row per scenario) and, last, one JSON object. Goal per scenario: 0 hung,
0 leaked KV blocks and frontend entries, bystanders 1.0 correct, every affected client told
within 10 s. --quick: fewer clients and tokens (a CI smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from greenroom.bench.reliability import DEADLINE_S, SCENARIOS, run_suite

COLUMNS = [
    ("scenario", "name", 16),
    ("requests", "requests", 8),
    ("hung", "hung", 5),
    ("errors", "explicit_errors", 7),
    ("bystanders", "bystanders_correct_fraction", 10),
    ("kv leak", "leaked_kv_blocks", 7),
    ("fe leak", "leaked_frontend_entries", 7),
    ("alive", "server_alive", 6),
    ("knew in s", "seconds_to_know", 9),
    ("pass", "passed", 5),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a CPU smoke run")
    names = [s.__name__ for s in SCENARIOS] + ["server_kill"]
    p.add_argument("--only", nargs="*", choices=names, help="run these scenarios only")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    results = asyncio.run(run_suite(args.quick, args.only))
    rows = [r.row() for r in results]
    print("  ".join(title.rjust(width) for title, _, width in COLUMNS))
    for row in rows:
        print("  ".join(str(row[key]).rjust(width) for _, key, width in COLUMNS))
    for row in rows:
        if row["notes"]:
            print(f"  {row['name']}: {row['notes']}")
    summary = {
        "bench": "reliability",
        "quick": args.quick,
        "deadline_s": DEADLINE_S,
        "all_passed": all(r["passed"] for r in rows),
        "hung": sum(r["hung"] for r in rows),
        "leaked_kv_blocks": sum(r["leaked_kv_blocks"] for r in rows),
        "leaked_frontend_entries": sum(r["leaked_frontend_entries"] for r in rows),
        "bystanders_correct_fraction": min(r["bystanders_correct_fraction"] for r in rows),
        "max_seconds_to_know": max(r["seconds_to_know"] for r in rows),
        "scenarios": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
