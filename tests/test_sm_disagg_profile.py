"""SM-disaggregation performance plumbing: engine step profiles, partition-sized launches."""

from __future__ import annotations

import asyncio

import pytest
import torch

from greenroom.actors.step_profile import EngineProfileQuery, StepProfile
from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.kernels import triton_decode_attention as tda
from greenroom.models.cuda_graphs import partition_sizing
from greenroom.node import Node


def test_step_profile_splits_decode_from_other_steps() -> None:
    p = StepProfile()
    for decode_only, batch, gpu in ((True, 4, 2.0), (True, 6, 3.0), (False, 2, None)):
        start, gap = p.begin()
        p.end(start, gap, decode_only, batch, gpu)
    s = p.summary()
    assert s["decode"]["steps"] == 2 and s["other"]["steps"] == 1
    assert s["decode"]["batch_mean"] == 5.0
    assert s["decode"]["forward_gpu_ms_mean"] == 2.5
    assert s["decode"]["forward_gpu_s_total"] == pytest.approx(0.005)
    assert s["decode"]["wall_s_total"] == pytest.approx(
        s["decode"]["wall_ms_mean"] * 2 / 1e3, abs=1e-3
    )
    assert s["decode"]["host_ms_mean"] == pytest.approx(s["decode"]["wall_ms_mean"] - 2.5, abs=1e-3)
    assert "forward_gpu_ms_mean" not in s["other"]
    p.reset()
    s = p.summary()
    assert (s["decode"], s["other"]) == ({"steps": 0}, {"steps": 0})
    assert all(v >= 0 for v in s["allocator"].values())  # counter deltas (none without CUDA)
    assert p.begin()[1] == 0.0  # no previous step: no gap


def test_split_k_follows_the_partition(monkeypatch) -> None:
    cuda = torch.device("cuda")
    # 16 requests x 8 kv heads = 128 programs: two per SM wants 2 splits on 132 SMs, 1 on 68
    assert tda.choose_num_splits(16, 8, 4096, cuda, sm_count=132) == 2
    assert tda.choose_num_splits(16, 8, 4096, cuda, sm_count=68) == 1
    monkeypatch.setattr(tda, "_sm_count", lambda _device: 132)
    assert tda.choose_num_splits(16, 8, 4096, cuda) == 2
    with tda.sm_budget(68):
        assert tda.choose_num_splits(16, 8, 4096, cuda) == 1
        assert tda._default_launch(16, 8, cuda)["block_n"] == 64  # 128 programs >= 68 SMs
    assert tda._default_launch(16, 8, cuda)["block_n"] == 128  # 128 programs < 132 SMs
    assert tda.choose_num_splits(16, 8, 4096, cuda) == 2
    assert tda.choose_num_splits(16, 8, 4096, torch.device("cpu")) == 1


def test_partition_sizing_is_a_no_op_without_a_partition() -> None:
    before = torch._C._get_sm_carveout_experimental()
    with partition_sizing(None):
        assert tda._SM_BUDGET.get() is None
    assert torch._C._get_sm_carveout_experimental() == before


@pytest.mark.parametrize(
    "sm,engine_host", [(False, "thread"), (False, "process"), (True, "thread")]
)
async def test_engines_report_step_profiles(sm: bool, engine_host: str) -> None:
    cfg = load_config(
        overrides={
            "port": 0,
            "kv.num_blocks": 128,
            "kv.enable_prefix_reuse": False,
            "scheduler.max_num_tokens": 32,
            "scheduler.max_batch_size": 8,
            "sm_disagg.enabled": sm,
            "sm_disagg.policy": "fixed",  # every prompt on the context engine: both profile
            "engine_host": engine_host,  # a process engine replies across the process boundary
            "log_level": "warning",
        }
    )
    node = await Node.start(cfg)
    try:
        names = ["context", "generation"] if sm else ["mixed"]
        for name in names:
            await node.refs[name].ask(EngineProfileQuery(reset=True), timeout=10)
        async with AsyncClient(node.address, timeout=60) as client:
            await asyncio.gather(
                *(
                    client.generate(list(range(1, 20 + i)), SamplingParams(max_tokens=6))
                    for i in range(4)
                )
            )
        profiles = {
            n: (await node.refs[n].ask(EngineProfileQuery(reset=True), timeout=10)).to_dict()
            for n in names
        }
    finally:
        await node.stop()
    decoder = profiles["generation" if sm else "mixed"]["decode"]
    assert decoder["steps"] >= 5  # 6 tokens each, the first from the prefill step
    assert decoder["wall_ms_mean"] > 0 and decoder["gap_ms_mean"] is not None
    if sm:
        assert profiles["context"]["decode"]["steps"] == 0
        assert profiles["context"]["other"]["steps"] >= 1


def test_user_speed_ceiling_is_mixed_tpot_over_its_decode_only_step() -> None:
    from greenroom.bench.sm_disagg import Point, user_speed_ceiling

    point = Point("mixed", "openorca", 64.0, 300, 0, 10.0, 6000.0, 100.0, 10.0, 30.0, 200.0, 20.0)
    profile = {
        "decode": {"steps": 750, "wall_ms_mean": 8.0},
        "other": {"steps": 250, "wall_ms_mean": 16.0},
    }
    row = user_speed_ceiling(point, profile)
    assert row["user_speedup_ceiling"] == 1.25  # (1000 / 8 ms) / 100 tok/s
    assert row["steps_with_prefill_share"] == 0.25
    assert user_speed_ceiling(point, {"other": {"steps": 3, "wall_ms_mean": 9.0}}) is None


def test_ceiling_reads_the_step_interval_of_overlapped_steps() -> None:
    """An overlapped step's wall time spans the next one's launch (about two intervals): the
    ceiling reads how often a decode step delivers tokens instead."""
    from greenroom.bench.sm_disagg import Point, user_speed_ceiling

    point = Point("mixed", "openorca", 64.0, 300, 0, 10.0, 6000.0, 100.0, 10.0, 30.0, 200.0, 20.0)
    profile = {"decode": {"steps": 10, "wall_ms_mean": 16.0, "interval_ms_p50": 8.0}}
    assert user_speed_ceiling(point, profile)["user_speedup_ceiling"] == 1.25


def test_step_intervals_follow_step_ends() -> None:
    from greenroom.actors.step_profile import StepRecord, step_intervals

    def rec(end_s: float, decode_only: bool) -> StepRecord:
        return StepRecord(end_s, 20.0, 0.0, None, 4, 4, decode_only, {})

    # decode every 8 ms, a prefill step 30 ms after its predecessor, then one idle gap of 1 s
    ends = [(0.0, True), (0.008, True), (0.016, True), (0.046, False), (0.054, True),
            (1.054, True), (1.062, True)]  # fmt: skip
    steps = [rec(t, d) for t, d in ends]
    iv = step_intervals(steps)
    assert iv[False] == pytest.approx([30.0])
    assert sorted(iv[True]) == pytest.approx([8.0, 8.0, 8.0, 8.0, 1000.0])
    p = StepProfile()
    p.steps.extend(steps)
    s = p.summary()
    assert s["decode"]["interval_ms_p50"] == pytest.approx(8.0)  # the idle gap does not count
    assert s["other"]["interval_ms_p50"] == pytest.approx(30.0)
    assert "interval_ms_p50" not in StepProfile().summary()["decode"]


def test_context_ttft_floor_is_busy_time_per_prompt_over_mixed_p99() -> None:
    from greenroom.bench.sm_disagg import Point, context_ttft_floor

    def point(mode: str, p99: float) -> Point:
        return Point(mode, "long_context", 1.0, 8, 0, 50.0, 90.0, 40.0, 25.0, 900.0, p99, 30.0)

    mixed, sm = point("mixed", 2000.0), point("adaptive50", 7600.0)
    row = context_ttft_floor(sm, {"other": {"steps": 23, "wall_s_total": 26.4}}, 8, mixed)
    assert row["floor_ms"] == 3300.0  # 26.4 s of context steps for 8 prompts
    assert row["floor_over_mixed_p99"] == 1.65  # out of reach whatever the queueing
    assert row["context_steps"] == 23 and row["mode"] == "adaptive50"
    assert context_ttft_floor(sm, {"other": {"steps": 0}}, 0, mixed) is None
