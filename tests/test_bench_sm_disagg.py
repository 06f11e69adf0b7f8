"""bench_sm_disagg: modes, per-mix comparisons against the mixed curve, the adaptive targets
as pass/fail fields, and the --quick run (tiny model on CPU) with its JSON last line."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from greenroom.bench.sm_disagg import Mode, Point, adaptive_targets, node_overrides, parse_modes


def point(mode: str, mix: str, rate: float, tput: float, user: float, ttft: float) -> Point:
    return Point(mode, mix, rate, 10, 0, 1.0, tput, user, 1000 / user, ttft, ttft, 1.0)


def test_modes_and_their_overrides() -> None:
    modes = parse_modes("mixed,fixed,adaptive,adaptive:512", "0.3")
    assert [m.name for m in modes] == ["mixed", "fixed30", "adaptive30", "adaptive30_t512"]
    o = node_overrides(modes[3], {"sm_disagg.routing_threshold_tokens": 0})
    assert o["sm_disagg.enabled"] and o["sm_disagg.policy"] == "adaptive"
    assert (
        o["sm_disagg.routing_threshold_tokens"] == 512 and o["sm_disagg.context_sm_percent"] == 0.3
    )
    assert node_overrides(modes[0], {})["sm_disagg.enabled"] is False
    for bad in ("sm30", "fixed:12", "adaptive:x", ""):
        with pytest.raises(ValueError):
            parse_modes(bad, "0.3")
    assert Mode.sm(0.5, "adaptive").name == "adaptive50"


def test_mode_options_set_one_modes_share_idle_riding_and_context_budget() -> None:
    modes = parse_modes(
        "mixed,adaptive,adaptive+idle+ctx=2048,adaptive:1024+share=0.7,adaptive+noidle", "0.3,0.5"
    )
    assert [m.name for m in modes] == [
        "mixed",
        "adaptive30",
        "adaptive50",
        "adaptive30_idle_ctx2048",
        "adaptive50_idle_ctx2048",
        "adaptive70_t1024",
        "adaptive30_noidle",
        "adaptive50_noidle",
    ]
    o = node_overrides(modes[3], {"sm_disagg.ride_when_generation_idle": False})
    assert o["sm_disagg.ride_when_generation_idle"] is True
    assert o["sm_disagg.context_max_num_tokens"] == 2048
    plain = node_overrides(modes[1], {"sm_disagg.ride_when_generation_idle": False})
    assert plain["sm_disagg.ride_when_generation_idle"] is False
    assert "sm_disagg.context_max_num_tokens" not in plain
    assert node_overrides(modes[5], {})["sm_disagg.context_sm_percent"] == 0.7
    off = node_overrides(modes[6], {"sm_disagg.ride_when_generation_idle": True})
    assert off["sm_disagg.ride_when_generation_idle"] is False
    for bad in (
        "fixed+idle",
        "adaptive+share=1.2",
        "adaptive+ctx=x",
        "adaptive+fast",
        "mixed+idle",
    ):
        with pytest.raises(ValueError):
            parse_modes(bad, "0.5")


def test_adaptive_targets_judge_each_mix_by_its_rule() -> None:
    mixed = [
        point("mixed", "openorca", 8, 1000, 100, 50),
        point("mixed", "openorca", 16, 2000, 80, 100),
        point("mixed", "long_context", 0.5, 300, 40, 2000),
        point("mixed", "long_context", 1.0, 600, 30, 4000),
    ]
    adaptive = [
        point("adaptive30", "openorca", 8, 1000, 99, 50),  # 0.99x: within "never loses"
        point("adaptive30", "openorca", 16, 2000, 76, 90),  # 0.95x: loses at this load
        point("adaptive30", "long_context", 0.5, 450, 45, 2500),  # 1.29x at equal throughput
        point("adaptive30", "long_context", 1.0, 700, 50, 5000),  # past the curve: equal load
    ]
    t = adaptive_targets(mixed + adaptive)
    orca, long = t["openorca/adaptive30"], t["long_context/adaptive30"]
    assert orca["pass"] is False and orca["user_speedup_min"] == pytest.approx(0.95)
    assert [r["meets_target"] for r in orca["rows"]] == [True, False]
    assert long["pass"] is True  # the best load meets 1.25x with TTFT p99 <= 1.0x
    r0, r1 = long["rows"]
    assert r0["compared_at"] == "equal_throughput" and r0["user_speedup"] == pytest.approx(
        1.286, abs=1e-3
    )
    assert r0["ttft_p99_ratio"] == pytest.approx(2500 / 3000, abs=1e-3)
    assert r1["compared_at"] == "equal_load" and r1["user_speedup"] == pytest.approx(
        50 / 30, abs=1e-3
    )
    assert not r1["meets_target"]  # TTFT p99 1.25x mixed
    only_mixed = adaptive_targets(mixed)
    assert only_mixed == {}


@pytest.mark.slow
def test_quick_run_reports_every_mode_mix_and_target(tmp_path) -> None:
    png = tmp_path / "pareto.png"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_sm_disagg.py",
            "--quick",
            "--mixes",
            "openorca,long_context",
            "--load",
            "openorca=40,160",
            "--load",
            "long_context=20",
            "--plot",
            str(png),
            "--out",
            "/dev/null",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["lost_requests"] == 0
    modes = {p["mode"] for p in out["points"]}
    assert modes == {"mixed", "fixed50", "adaptive50"}
    assert {(p["mode"], p["mix"]) for p in out["points"]} == {
        (m, x) for m in modes for x in ("openorca", "long_context")
    }
    assert set(out["targets"]) == {"openorca/adaptive50", "long_context/adaptive50"}
    for t in out["targets"].values():
        assert t["pass"] in (True, False) and t["user_speedup_min"] > 0
    assert set(out["comparisons"]) == {
        f"{x}/{m}" for x in ("openorca", "long_context") for m in ("fixed50", "adaptive50")
    }
    assert out["routing_threshold_tokens"]["adaptive50"] >= 1  # measured at start
    assert out["routed"]["fixed50"]["prompts_in_generation"] == 0
    assert out["routed"]["adaptive50"]["prompts_in_generation"] > 0
    assert out["user_speedup_ceilings"] and out["targets_met"] in (True, False)
    # fixed routing prefills every prompt on the context engine: a TTFT floor at every point
    fixed_floors = {k: v for k, v in out["context_ttft_floors"].items() if k.endswith("/fixed50")}
    assert {k.split("@")[0] for k in fixed_floors} == {"openorca", "long_context"}
    assert all(v > 0 for v in fixed_floors.values())
    # the Pareto curves and the targets view (ratios against the target regions)
    assert png.stat().st_size > 0 and (tmp_path / "pareto_targets.png").stat().st_size > 0


def test_targets_plot_needs_a_comparison(tmp_path) -> None:
    from greenroom.bench.sm_disagg import plot_targets

    path = tmp_path / "t.png"
    plot_targets({"openorca": {"adaptive50": []}}, str(path), "nothing compared")
    assert not path.exists()
    row = {"rate": 8.0, "user_speedup": 1.01, "ttft_p99_ratio": 0.9,
           "ttft_p99_ratio_interval90": [0.8, 1.1]}  # fmt: skip
    plot_targets({"openorca": {"adaptive50": [row]}}, str(path), "one point")
    assert path.stat().st_size > 0


@pytest.mark.slow
def test_points_past_the_budget_are_skipped_and_the_run_still_reports() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_sm_disagg.py",
            "--quick",
            "--mixes",
            "decode_heavy",
            "--modes",
            "mixed,adaptive:16",
            "--budget-s",
            "0",
            "--plot",
            "",
            "--out",
            "/dev/null",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["points"] == [] and out["targets_met"] is None
    assert out["skipped"] == {"mixed": ["decode_heavy@40"], "adaptive50_t16": ["decode_heavy@40"]}
    assert out["routing_threshold_tokens"] == {"adaptive50_t16": 16}


def test_ttft_p99_ratio_interval_tells_noise_from_a_real_gap() -> None:
    from greenroom.bench.sm_disagg import ttft_p99_ratio_interval

    rng = random.Random(11)
    mixed = [rng.lognormvariate(3.0, 0.3) for _ in range(200)]
    same = [rng.lognormvariate(3.0, 0.3) for _ in range(200)]  # another run of one mode
    slow = [2.0 * t for t in same]
    lo, hi = ttft_p99_ratio_interval(same, mixed)
    assert lo < 1.0 < hi  # a run of the same distribution: cannot be told apart
    lo, hi = ttft_p99_ratio_interval(slow, mixed)
    assert 1.3 < lo < hi  # twice the TTFT: clearly worse
    assert ttft_p99_ratio_interval(same, mixed) == ttft_p99_ratio_interval(same, mixed)  # seeded
    assert ttft_p99_ratio_interval(same[:10], mixed) is None


def test_comparisons_carry_the_interval_at_equal_load() -> None:
    from greenroom.bench.sm_disagg import compare_at_equal_throughput

    def p(mode: str, ttfts: list[float]) -> Point:
        return Point(mode, "openorca", 16.0, 100, 0, 10.0, 2000.0, 150.0, 6.6, 20.0,
                     max(ttfts, default=30.0), 9.0, tuple(ttfts))  # fmt: skip

    mixed = p("mixed", [20.0 + i % 7 for i in range(100)])
    sm = p("adaptive50", [21.0 + i % 7 for i in range(100)])
    (row,) = compare_at_equal_throughput([mixed], [sm], equal_load_fallback=True)
    lo, hi = row["ttft_p99_ratio_interval90"]
    assert lo <= row["ttft_p99_ratio"] <= hi
    (row,) = compare_at_equal_throughput([mixed], [p("adaptive50", [])], equal_load_fallback=True)
    assert row["ttft_p99_ratio_interval90"] is None
