"""bench_pp --quick: a PP 2 node and a TP 2 node on CPU ranks; reports the bubble, the launch
gap and tokens/s as its last line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_run_reports_the_bubble_and_gaps() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_pp.py", "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pp = out["pp"]
    assert len(pp["stage_busy_fraction"]) == 2
    assert all(0 < b <= 1 for b in pp["stage_busy_fraction"])
    assert pp["micro_batches"] > 0 and pp["launch_gap_p99_ms"] >= 0
    assert out["tokens_per_s_pp_over_tp"] > 0
