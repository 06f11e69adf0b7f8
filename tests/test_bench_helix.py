"""bench_helix --quick: runs on CPU ranks and reports balanced KV and flat exchange bytes."""

from __future__ import annotations

import json
import subprocess
import sys

from greenroom.bench.helix import kv_balance


def test_helix_placement_keeps_ranks_within_a_request_count_of_blocks() -> None:
    out = kv_balance(cp=3, tokens_per_block=16, num_requests=10, seed=1)
    # every request's blocks differ by at most one between ranks
    assert out["max_spread_blocks"] <= 10 < out["baseline_max_spread_blocks"]


def test_quick_run_reports_the_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_helix.py", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cp_size"] == 2
    assert out["all_to_all_bytes_growth"] == 1.0
    assert out["kv_max_spread_blocks"] < out["kv_baseline_max_spread_blocks"]
    assert out["decode_attention_ms_cp"] > 0 and out["decode_attention_ms_cp1"] > 0
