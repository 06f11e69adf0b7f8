"""The compute-bound prompt length: the knee of a prefill-time ladder (pure), and its
measurement on a real runner (CPU: the tiny model, well under a second)."""

from __future__ import annotations

import time

import pytest

from greenroom.models.compute_bound import knee_tokens, measure_compute_bound_tokens

LADDER = [16, 32, 64, 128, 256, 512, 1024, 2048]


def roofline(floor_ms: float, per_token_ms: float, sizes=LADDER) -> list[float]:
    return [max(floor_ms, n * per_token_ms) for n in sizes]


@pytest.mark.parametrize(
    ("floor_ms", "per_token_ms", "knee"),
    [(20.0, 0.1, 200), (23.0, 0.29, 79), (10.0, 0.01, 1000), (8.0, 0.01, 800)],
)
def test_knee_is_where_the_weight_read_floor_meets_the_compute_line(floor_ms, per_token_ms, knee):
    assert knee_tokens(LADDER, roofline(floor_ms, per_token_ms)) == pytest.approx(knee, rel=0.02)


def test_knee_tolerates_a_smooth_transition_and_noise():
    # time = floor + tokens * rate, with +-3% noise: the knee lies between the two regimes
    noise = [1.02, 0.97, 1.03, 0.98, 1.01, 0.99, 1.02, 0.97]
    times = [(20 + 0.1 * n) * e for n, e in zip(LADDER, noise, strict=True)]
    assert 100 <= knee_tokens(LADDER, times) <= 512


def test_knee_beyond_or_below_the_ladder():
    assert knee_tokens(LADDER, [10.0] * len(LADDER)) == 2 * LADDER[-1]  # never compute-bound
    assert knee_tokens(LADDER, roofline(5.0, 0.0025)) == 2 * LADDER[-1]  # knee at 2000: past it
    assert knee_tokens(LADDER, [n * 0.1 for n in LADDER]) == LADDER[0]  # always


def test_knee_refuses_bad_ladders():
    with pytest.raises(ValueError, match="at least two"):
        knee_tokens([16], [1.0])
    with pytest.raises(ValueError, match="ascending"):
        knee_tokens([32, 16], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        knee_tokens([16, 32], [0.0, 2.0])


def test_measured_on_the_tiny_model_in_under_a_second():
    from greenroom.config import KVConfig, ModelConfig
    from greenroom.models.runner import ModelRunner

    runner = ModelRunner(ModelConfig(device="cpu"), KVConfig(num_blocks=64))
    t0 = time.perf_counter()
    m = measure_compute_bound_tokens(runner, max_tokens=64)
    assert time.perf_counter() - t0 < 1.0
    assert m.sizes == [8, 16, 32, 64][: len(m.sizes)] and len(m.sizes) >= 3
    assert len(m.step_ms) == len(m.sizes) and min(m.step_ms) > 0
    assert m.tokens == knee_tokens(m.sizes, m.step_ms)
    with pytest.raises(ValueError, match="routing_threshold_tokens"):
        tiny_pool = KVConfig(num_blocks=2, tokens_per_block=4)  # 4 usable tokens
        measure_compute_bound_tokens(ModelRunner(ModelConfig(device="cpu"), tiny_pool))
