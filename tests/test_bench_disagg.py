"""bench_disagg --quick end to end (small sizes): one JSON object as the last line, with the
transfer ratio against the local copy and both serving configurations measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from greenroom.bench.disagg import fragmented_blocks
from greenroom.kv.transfer import block_runs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_disagg.py"


def test_fragmented_blocks_are_shuffled_runs() -> None:
    blocks = fragmented_blocks(20, 8, seed=1)
    assert sorted(blocks) == list(range(1, 21))
    assert len(block_runs(blocks, blocks)) <= 3


@pytest.mark.slow
def test_quick_run_prints_one_json_object_last(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_disagg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--tokens", "256,1024", "--requests", "6"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["tokens"] for t in out["transfer"]] == [256, 1024]
    assert all(
        t["nixl_gbps"] > 0 and t["copy_gbps"] > 0 and t["ratio"] > 0 for t in out["transfer"]
    )
    serving = out["serving"]
    assert serving["leaked_blocks"] == 0
    for side in ("context_generation", "mixed_x2"):
        assert serving[side]["completed"] == 6 and serving[side]["failed"] == 0
        assert serving[side]["ttft_p99_ms"] > 0 and serving[side]["itl_p99_ms"] > 0
