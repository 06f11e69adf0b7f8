"""bench_kernels --quick: the CPU smoke run prints every section, windowed cases included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_kernels.py"


def test_quick_run_reports_windowed_cases() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["quick"] is True
    assert result["decode"] and result["prefill"]
    (decode,) = result["decode_window"]
    assert (decode["batch"], decode["context"], decode["window"]) == (2, 256, 64)
    token_bytes = 2 * 8 * 128 * 4  # K and V, 8 kv heads of dim 128, float32
    assert decode["kv_bytes_per_token"] == 64 * token_bytes
    assert decode["whole_context_kv_bytes_per_token"] == 256 * token_bytes
    assert decode["ratio_if_whole_context_read"] > decode["ratio"] > 0
    (prefill,) = result["prefill_window"]
    assert prefill["keys_per_query"] == sum(min(i + 1, 64) for i in range(128)) / 128
    assert prefill["TFLOPs"] > 0 and prefill["ratio"] > 0
