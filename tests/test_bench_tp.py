"""bench_tp --quick: a CPU run on two gloo ranks ends with one JSON object of ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_tp.py"


def test_quick_run_prints_one_json_result() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tp_size"] == 2
    for key in ("decode_speedup_vs_tp1", "prefill_speedup_vs_tp1"):
        assert result[key] > 0
    ar = result["all_reduce"]
    assert ar["per_decode_step"] == 2 * 4 + 1  # o_proj and down in each of 4 layers, embedding
    assert ar["in_step_bandwidth_vs_bare"] > 0
    assert result["serving"]["node_vs_bare_tp_loop"] > 0
