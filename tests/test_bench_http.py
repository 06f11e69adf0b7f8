"""bench_http --quick: a CPU smoke run whose last stdout line is the JSON summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_http_quick_prints_a_json_summary() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench_http.py", "--quick", "--concurrency", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "http" and summary["device"] == "cpu"
    wave = summary["concurrency"]["8"]
    for side in ("native", "http"):
        assert wave[side]["failed"] == 0
        assert wave[side]["output_tokens"] == 8 * summary["max_tokens"]
    assert wave["tokens_per_s_ratio"] > 0
    assert wave["added_ttft_p50_ms"] == pytest.approx(
        wave["http"]["ttft_p50_ms"] - wave["native"]["ttft_p50_ms"]
    )
