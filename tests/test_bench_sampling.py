"""bench_sampling --quick: runs and reports the options-over-plain ratios as its last line."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_run_reports_ratios() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_sampling.py", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("greedy", "sampled"):
        assert out[f"{name}_plain_ms"] > 0 and out[f"{name}_options_ms"] > 0
        ratio = out[f"{name}_options_over_plain"]
        assert ratio > 0
