"""bench_helix --quick: runs on CPU ranks and reports balanced KV, flat exchange bytes and the\ndecode step time at cp 2 against one rank."""

from __future__ import annotations

import json
import subprocess
import sys

from greenroom.bench.helix import kv_balance
from greenroom.bench.helix_step import decode_chunks


def test_helix_placement_keeps_ranks_within_a_request_count_of_blocks() -> None:
    out = kv_balance(cp=3, tokens_per_block=16, num_requests=10, seed=1)
    # every request's blocks differ by at most one between ranks
    assert out["max_spread_blocks"] <= 10 < out["baseline_max_spread_blocks"]


def test_timed_step_places_the_blocks_as_the_kv_manager_would() -> None:
    chunks, per_rank = decode_chunks(batch=3, ctx=70, tpb=16, cp=2)  # 5 blocks a request
    assert per_rank == 1 + 3 * 3
    held = [b for c in chunks for b in c.block_ids]
    assert len(set(held)) == len(held) == 15
    for c in chunks:
        assert [b // per_rank for b in c.block_ids] == [0, 1, 0, 1, 0]
        assert all(b % per_rank for b in c.block_ids)  # never a rank's null block
        assert c.num_cached == 69 and len(c.token_ids) == 1


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
    assert out["step_context"] == 4096 and out["step_model"] == "random:small"
    assert out["decode_step_ms_cp"] > 0 and out["decode_step_ms_cp1"] > 0
