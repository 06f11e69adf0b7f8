"""bench_scheduler: the scheduler-cost driver runs both modes on the real core and KV manager,
and the script's --quick run ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from greenroom.bench.scheduler_cost import iteration_cost


@pytest.mark.parametrize("mode", ["mixed", "adaptive"])
def test_iteration_cost_drives_a_steady_decode_batch(mode: str) -> None:
    cost = iteration_cost(mode, running=8, iterations=50)
    assert cost.mode == mode and cost.iterations == 50
    assert 0 < cost.us_per_iteration_p50 and 0 < cost.us_per_iteration


def test_iteration_cost_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        iteration_cost("fixed", 8, 10)
    with pytest.raises(ValueError):
        iteration_cost("mixed", 0, 10)


def test_quick_run_prints_json_last() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/bench_scheduler.py", "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "scheduler_cost"
    (row,) = result["rows"]
    assert row["running"] == 8 and row["adaptive_over_mixed"] > 0
    bad = subprocess.run(
        [sys.executable, "scripts/bench_scheduler.py", "--running", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--running" in bad.stderr
