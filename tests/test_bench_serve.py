"""bench_serve: the steady-window arithmetic, the bare loop's plans, and a --quick smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from greenroom.bench.serve import DecodeWorkload, bare_decode, bare_plans, steady_window
from greenroom.config import KVConfig, ModelConfig
from greenroom.models.executor import PlanExecutor
from greenroom.models.runner import ModelRunner

ROOT = Path(__file__).resolve().parent.parent


def test_steady_window_counts_only_while_all_decode():
    # request 0 starts at t=0, request 1 at t=2; one token per request per second
    a = [(float(t), 1) for t in range(10)]
    b = [(float(t), 1) for t in range(2, 12)]
    rate = steady_window([a, b], warmup_tokens=1)
    # opens when b has 2 tokens (t=3), closes at a's last delta (t=9): t in (3, 9]
    assert rate.seconds == pytest.approx(6.0)
    assert rate.tokens == 12
    assert rate.tokens_per_s == pytest.approx(2.0)
    assert rate.batch == 2


def test_steady_window_rejects_a_workload_too_short_to_overlap():
    a = [(0.0, 1), (1.0, 1)]
    b = [(5.0, 1), (6.0, 1)]
    with pytest.raises(ValueError, match="no steady decode window"):
        steady_window([a, b], warmup_tokens=1)
    with pytest.raises(ValueError, match="fewer than"):
        steady_window([a], warmup_tokens=5)


@pytest.fixture(scope="module")
def executor() -> PlanExecutor:
    runner = ModelRunner(ModelConfig(max_model_len=256), KVConfig(num_blocks=64), device="cpu")
    return PlanExecutor(runner)


def testbare_plans_grow_block_tables_like_the_kv_manager(executor):
    work = DecodeWorkload(num_requests=3, prompt_len=16, max_tokens=20, warmup_tokens=2)
    prompts = work.prompts(vocab_size=500)
    prefill, decode = bare_plans(executor, prompts, work, max_num_tokens=32)
    assert [len(p.steps) for p in prefill] == [2, 1]  # 16 + 16 fit 32 tokens; the third waits
    assert all(len(n.block_ids) == 1 for p in prefill for n in p.new)
    assert len(decode) == work.max_tokens - 1
    grown = {rid: 1 for rid in (s.request_id for p in prefill for s in p.steps)}
    for k, plan in enumerate(decode, start=1):
        for step in plan.steps:
            grown[step.request_id] += len(step.new_block_ids)
            assert grown[step.request_id] * 16 >= 16 + k  # room for the token this step writes
    assert set(grown.values()) == {3}  # 16 + 19 computed tokens need 3 blocks of 16
    with pytest.raises(ValueError, match="KV blocks"):
        bare_plans(executor, work.prompts(500) * 30, work, 32)


def test_bare_decode_times_the_steps_after_warmup_and_cleans_up(executor):
    work = DecodeWorkload(num_requests=4, prompt_len=12, max_tokens=10, warmup_tokens=3)
    prompts = work.prompts(vocab_size=500, seed=3)
    rate = bare_decode(executor, prompts, work)
    assert rate.batch == 4
    assert rate.tokens == 4 * (work.max_tokens - 1 - work.warmup_tokens)
    assert rate.tokens_per_s > 0
    assert executor.sequences == {}


@pytest.mark.slow
def test_quick_run_prints_one_json_result():
    proc = subprocess.run(
        [sys.executable, "scripts/bench_serve.py", "--quick", "--repeats", "1", "--batch", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["quick"] is True
    overhead = result["overhead"]
    assert overhead["greenroom"]["batch"] == overhead["bare"]["batch"] == 16
    assert overhead["ratio"] == pytest.approx(
        overhead["greenroom"]["tokens_per_s"] / overhead["bare"]["tokens_per_s"]
    )
    process = overhead["greenroom_process_engine"]
    assert process["engine_host"] == "process" and process["batch"] == 16
    assert overhead["ratio_process_engine"] > 0
    assert (
        result["ratios"]["greenroom_process_engine_over_bare"] == overhead["ratio_process_engine"]
    )
    rows = result["sweep"]["rows"]
    assert [r["load"] for r in rows] == [8.0, 32.0]
    assert all(r["num_completed"] == r["num_sent"] and r["num_failed"] == 0 for r in rows)
    assert result["lost_requests"] == 0
    assert all(r["ttft_ms_p99"] > 0 and r["tpot_ms_p99"] > 0 for r in rows)
    peer = result["peer"]
    assert peer["transformers"]["output_tokens"] == peer["greenroom"]["output_tokens"]
    assert peer["transformers"]["short_outputs"] == 0
    assert result["ratios"]["greenroom_over_transformers"] == pytest.approx(
        peer["greenroom"]["output_tokens_per_s"] / peer["transformers"]["output_tokens_per_s"]
    )


def test_help_explains_the_three_parts():
    proc = subprocess.run(
        [sys.executable, "scripts/bench_serve.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "overhead" in proc.stdout and "sweep" in proc.stdout and "--quick" in proc.stdout
