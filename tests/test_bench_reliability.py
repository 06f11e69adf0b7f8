"""The chaos suite's --quick form: every scenario meets the goal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_chaos_suite_passes_every_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_reliability.py", "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [r for r in result["scenarios"] if not r["passed"]]
    assert not failed, proc.stdout
    assert len(result["scenarios"]) == 9
    assert result["hung"] == 0 and result["bystanders_correct_fraction"] == 1.0
