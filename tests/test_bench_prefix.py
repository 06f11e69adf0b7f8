"""The prefix-reuse benchmark: trace scaling, the ideal hit rate (checked against the real KV
manager with a pool that never fills), the copy measurement on CPU, and the script end to end
against real nodes on a small synthetic Mooncake trace."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from greenroom.bench.prefix import (
    IdealHits,
    ideal_hits,
    mode_overrides,
    mode_summary,
    scaled_requests,
    select_conversations,
    trace_ideal_hits,
)
from greenroom.bench.prefix_copies import onboard_bandwidth
from greenroom.bus.messages import KVAdmit, KVComputed, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager
from greenroom.replay.metrics import summarize
from greenroom.replay.readers import TraceRow
from greenroom.replay.report import PrefixStats, RequestRecord
from greenroom.replay.trace import build_requests

REPO = Path(__file__).resolve().parents[1]


def conversation_rows(num_conversations: int, turns: int, seed: int = 0) -> list[TraceRow]:
    """Multi-turn conversations: each turn repeats the last turn's blocks and adds new ones."""
    rng = random.Random(seed)
    rows, next_id, t = [], 0, 0.0
    convs = []
    for _ in range(num_conversations):
        n = rng.randint(2, 5)
        convs.append(list(range(next_id, next_id + n)))
        next_id += n
    for _ in range(turns):
        for blocks in convs:
            t += rng.uniform(0.01, 0.05)
            length = 512 * (len(blocks) - 1) + rng.randint(1, 512)
            rows.append(TraceRow(t, length, rng.randint(1, 4), list(blocks)))
            extra = rng.randint(1, 3)
            blocks.extend(range(next_id, next_id + extra))
            next_id += extra
    return rows


def test_select_conversations_keeps_whole_conversations() -> None:
    rows = conversation_rows(10, 3)
    kept = select_conversations(rows, 2)
    roots = {r.hash_ids[0] for r in kept}
    assert roots and all(h % 2 == 0 for h in roots)
    assert kept == [r for r in rows if r.hash_ids[0] in roots]
    assert select_conversations(rows, 1) == rows
    with pytest.raises(ValueError, match="stride"):
        select_conversations(rows, 0)


def test_full_scale_prompts_equal_the_replay_tools() -> None:
    rows = conversation_rows(4, 2)
    ours = scaled_requests(rows, vocab_size=512, max_model_len=4096)
    theirs = build_requests(rows, vocab_size=512, max_model_len=4096)
    assert [r.index for r in ours] == [r.index for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.prompt_token_ids, b.prompt_token_ids)
        assert (a.max_tokens, a.clipped) == (b.max_tokens, b.clipped)


def test_scaled_prompts_keep_the_block_structure() -> None:
    rows = [
        TraceRow(0.0, 1100, 2, [7, 8, 9]),
        TraceRow(1.0, 1536, 2, [7, 8, 10]),
        TraceRow(2.0, 600, 9, []),
    ]
    a, b, c = scaled_requests(rows, vocab_size=512, tokens_per_hash_block=8, max_output_len=4)
    assert (a.prompt_length, b.prompt_length, c.prompt_length) == (18, 24, 10)  # ceil(len * 8/512)
    np.testing.assert_array_equal(a.prompt_token_ids[:16], b.prompt_token_ids[:16])
    assert not np.array_equal(a.prompt_token_ids[16:18], b.prompt_token_ids[16:18])
    assert c.max_tokens == 4 and c.capped
    capped = scaled_requests(rows[:1], vocab_size=512, tokens_per_hash_block=8, max_input_len=12)
    assert capped[0].prompt_length == 12 and capped[0].capped
    with pytest.raises(ValueError, match="tokens_per_hash_block"):
        scaled_requests(rows, vocab_size=512, tokens_per_hash_block=0)


def test_ideal_hits_by_hand() -> None:
    tpb = 4
    p1 = list(range(10))  # blocks [0..3] [4..7], eligible (10-1)//4 = 2
    p2 = list(range(8)) + [50, 51, 52, 53, 54]  # shares both blocks, eligible 3
    p3 = [0, 1, 2, 3, 9, 9, 9, 9, 4]  # first block only, eligible 2
    got = ideal_hits([p1, p2, p3], tpb)
    assert (got.lookup_blocks, got.hit_blocks) == (2 + 3 + 2, 0 + 2 + 1)
    assert got.distinct_blocks == 2 + 1 + 1
    assert ideal_hits([[1, 2, 3, 4]] * 2, 4).hit_blocks == 0  # the last token is recomputed
    rows = [TraceRow(0, 1, 1, [1, 2]), TraceRow(1, 1, 1, [1, 3]), TraceRow(2, 1, 1, [4, 2])]
    t = trace_ideal_hits(rows)
    assert (t.lookup_blocks, t.hit_blocks, t.distinct_blocks) == (6, 1, 4)
    assert t.rate == pytest.approx(1 / 6)
    # blocks a length cap cut off are not looked up: row 2 keeps only its first block
    t = trace_ideal_hits(rows, kept_blocks=[2, 1, 2])
    assert (t.lookup_blocks, t.hit_blocks, t.distinct_blocks) == (5, 1, 3)


def test_select_conversations_behind_a_shared_system_prompt() -> None:
    """Every row starting with the same blocks (a system prompt) still thins by conversation."""
    plain = conversation_rows(12, 3, seed=2)
    system = [10_000, 10_001]
    rows = [TraceRow(r.arrival_s, r.input_length + 1024, 1, system + r.hash_ids) for r in plain]
    kept = select_conversations(rows, 3)
    expect = {i for i, r in enumerate(plain) if r.hash_ids[0] % 3 == 0}
    assert 0 < len(kept) < len(rows)
    assert kept == [rows[i] for i in sorted(expect)]


def test_mode_summary_counts_failed_requests_as_misses() -> None:
    ideal = IdealHits(lookup_blocks=100, hit_blocks=50, distinct_blocks=70)
    done = [
        RequestRecord(index=i, scheduled_s=0.0, ttft_s=0.01, e2e_s=0.02, output_tokens=1)
        for i in range(3)
    ]
    failed = RequestRecord(index=3, scheduled_s=0.0, error_kind="overloaded")
    report = summarize([*done, failed], 1.0)
    report.prefix = PrefixStats(reused_blocks=20, onboarded_blocks=5, missed_blocks=5)
    report.prefix.hit_rate = 25 / 30  # over the completed requests only
    report.run = {
        "kv_stats": {
            "hit_blocks": 25,
            "lookups_blocks": 30,
            "onboarded_blocks": 5,
            "offloaded_blocks": 0,
            "host_blocks": 0,
        },
        "scheduler_stats": {},
        "num_gpu_blocks": 64,
    }
    got = mode_summary(report, 512, ideal)
    assert got["failed"] == 1
    assert got["hit_rate"] == 0.25  # 25 hits over the 100 lookups of every request
    assert got["hit_rate_of_ideal"] == 0.5
    assert got["hit_rate_of_completed"] == round(25 / 30, 4)


def test_ideal_hits_equal_an_unbounded_kv_manager() -> None:
    tpb = 8
    requests = scaled_requests(
        conversation_rows(8, 4, seed=3), vocab_size=512, tokens_per_hash_block=8
    )
    manager = KVCacheManager(KVConfig(tokens_per_block=tpb), num_gpu_blocks=10_000)
    for i, r in enumerate(requests):
        tokens = r.prompt_token_ids.tolist()
        rid = f"r{i}"
        admit = KVAdmit(request_id=rid, token_ids=tokens, reserve_tokens=len(tokens))
        manager.step(KVStep(iteration=3 * i, admit=[admit]))
        manager.step(KVStep(iteration=3 * i + 1, computed=[KVComputed(rid, len(tokens))]))
        manager.step(KVStep(iteration=3 * i + 2, free=[KVFree(rid)]))
    stats = manager.stats()
    ideal = ideal_hits((r.prompt_token_ids for r in requests), tpb)
    assert ideal.hit_blocks > 0
    assert (stats.lookups_blocks, stats.hit_blocks) == (ideal.lookup_blocks, ideal.hit_blocks)


def test_mode_overrides() -> None:
    assert mode_overrides("no_reuse", 100, 50)["kv.enable_prefix_reuse"] is False
    assert mode_overrides("gpu_reuse", 100, 50)["kv.host_blocks"] == 0
    host = mode_overrides("host_tier", 100, 50)
    assert host == {"kv.num_blocks": 100, "kv.enable_prefix_reuse": True, "kv.host_blocks": 50}
    with pytest.raises(ValueError, match="mode"):
        mode_overrides("disk_tier", 1, 1)


def test_onboard_bandwidth_on_cpu_checks_and_times_the_executor() -> None:
    out = onboard_bandwidth((2, 6), preset="small", device="cpu", reps=2, warmup=1)
    assert out["device"] == "cpu" and out["block_bytes"] == 4 * 2 * 16 * 2 * 32 * 4
    assert [r["blocks"] for r in out["batches"]] == [2, 6]
    for row in out["batches"]:
        assert row["plain_ms"] > 0 and row["onboard_random_ms"] > 0 and row["onboard_of_plain"] > 0
    assert out["min_onboard_of_plain"] == min(r["onboard_of_plain"] for r in out["batches"])


def load_script():
    spec = importlib.util.spec_from_file_location("bench_prefix", REPO / "scripts/bench_prefix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_script_runs_every_mode_on_a_small_trace(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = conversation_rows(10, 4, seed=1)
    trace.write_text(
        "".join(
            json.dumps(
                {
                    "timestamp": int(r.arrival_s * 1000),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": r.hash_ids,
                }
            )
            + "\n"
            for r in rows
        )
    )
    out = tmp_path / "out"
    bench = load_script()
    argv = [str(trace), "--quick", "--conversation-stride", "1", "--time-scale", "1"]
    argv += ["--gpu-blocks", "40", "--out", str(out)]
    argv += ["--copies", "off"]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["requests"] == len(rows) and result["failed"] == 0
    assert result["plans_over_budget"] == 0
    modes = result["modes"]
    assert set(modes) == {"no_reuse", "gpu_reuse", "host_tier"}
    assert (
        modes["no_reuse"]["hit_rate"] == 0
        and modes["no_reuse"]["prefill_tokens"] >= result["prompt_tokens"]
    )
    host = modes["host_tier"]
    assert host["onboarded_blocks"] > 0 and host["node_offloaded_blocks"] > 0
    assert result["host_tier_hit_rate_of_ideal"] >= 0.95
    assert (
        host["prefill_tokens"]
        < modes["gpu_reuse"]["prefill_tokens"]
        < modes["no_reuse"]["prefill_tokens"]
    )
    for m in modes.values():
        assert m["max_plan_tokens"] <= m["max_num_tokens"] == 512
    assert result["lost_requests"] == 0 and result["complete"] is True
    report = json.loads((out / "prefix_host_tier.json").read_text())
    assert report["prefix"]["onboarded_blocks"] == host["onboarded_blocks"]
    assert report["run"]["kv_stats"]["onboarded_blocks"] == host["node_onboarded_blocks"]
    assert report["run"]["kv_stats"]["hit_blocks"] > 0


@pytest.mark.slow
def test_script_that_loses_requests_says_so_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "trace.jsonl"
    rows = conversation_rows(6, 2, seed=4)
    trace.write_text(
        "".join(
            json.dumps(
                {"timestamp": 0, "input_length": r.input_length, "output_length": 2}
            ).replace("}", f', "hash_ids": {r.hash_ids}}}')
            + "\n"
            for r in rows
        )
    )
    argv = [str(trace), "--quick", "--conversation-stride", "1", "--time-scale", "0"]
    argv += ["--modes", "gpu_reuse", "--copies", "off", "--set", "scheduler.max_queue_size=1"]
    assert load_script().main(argv) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lost_requests"] > 0 and result["complete"] is False
    assert result["modes"]["gpu_reuse"]["failures"].get("overloaded", 0) > 0
