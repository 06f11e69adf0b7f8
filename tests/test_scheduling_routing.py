"""Adaptive SM-disaggregation routing: which prompts go to the context engine, which ride in
the generation step (the pure decision; the scheduler core asks it)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greenroom.actors.scheduling.routing import (
    FlowRoom,
    Waiting,
    compute_bound_tokens,
    route_prompts,
    routing_threshold,
)


def test_threshold_is_where_matmul_time_reaches_one_weight_read() -> None:
    # 8B shape: 16 GB of weights, 14 GFLOP per token; 40 of 132 SMs at 760 TFLOP/s, 4.2 TB/s
    n = compute_bound_tokens(16.06e9, 1.4e10, 760e12 * 40 / 132, 4.2e12)
    assert 60 < n < 70
    # the prefill of n tokens takes one weight read's time at those rates
    assert n * 1.4e10 / (760e12 * 40 / 132) == pytest.approx(16.06e9 / 4.2e12, rel=0.02)
    with pytest.raises(ValueError):
        compute_bound_tokens(0, 1, 1, 1)


def test_measured_threshold_is_a_multiple_of_the_knee() -> None:
    assert routing_threshold(128, 8.0) == 1024
    assert routing_threshold(128, 1.0) == 128  # the knee itself
    assert routing_threshold(100, 2.5) == 250
    for knee, multiple in ((0, 8.0), (128, 0.5)):
        with pytest.raises(ValueError, match="invalid"):
            routing_threshold(knee, multiple)


def test_a_long_prompt_rides_while_the_generation_flow_carries_nothing() -> None:
    prompts = [Waiting("L1", 3000), Waiting("L2", 400), Waiting("s1", 40)]
    idle, busy = FlowRoom(4096, 64, running=0), FlowRoom(4000, 60, running=4)
    r = route_prompts("adaptive", prompts, 100, FlowRoom(8192, 8), idle, ride_when_idle=True)
    # the first prompt that fits rides; the step then carries it, so the next long one does not
    assert r.generation == ["L1", "s1"] and r.context == ["L2"]
    for gen, ride in ((busy, True), (idle, False)):
        r = route_prompts("adaptive", prompts, 100, FlowRoom(8192, 8), gen, ride_when_idle=ride)
        assert r.generation == ["s1"] and r.context == ["L1", "L2"]
    # a prompt past the generation step's room goes to the context engine, the next may ride
    r = route_prompts(
        "adaptive", [Waiting("XL", 9000), *prompts[1:]], 100, FlowRoom(8192, 8), idle, True
    )
    assert r.context == ["XL"] and r.generation == ["L2", "s1"]
    r = route_prompts("fixed", prompts, 100, FlowRoom(8192, 8), idle, ride_when_idle=True)
    assert r.generation == []


def test_fixed_sends_every_prompt_to_the_context_engine() -> None:
    prompts = [Waiting("a", 20), Waiting("b", 3000), Waiting("c", 10)]
    r = route_prompts("fixed", prompts, 100, FlowRoom(8192, 8), FlowRoom(512, 64))
    assert r.context == ["a", "b", "c"] and r.generation == [] and r.waiting == []


def test_adaptive_lets_short_prompts_ride_and_batches_long_ones() -> None:
    prompts = [Waiting("s1", 40), Waiting("L1", 3000), Waiting("s2", 90), Waiting("L2", 4000)]
    r = route_prompts("adaptive", prompts, 100, FlowRoom(8192, 8), FlowRoom(512, 64))
    assert r.generation == ["s1", "s2"]
    assert r.context == ["L1", "L2"]  # both long prompts in one context plan
    assert r.waiting == []


def test_a_short_prompt_without_generation_room_goes_to_context_not_the_queue() -> None:
    prompts = [Waiting("s1", 80), Waiting("s2", 80), Waiting("s3", 80)]
    r = route_prompts("adaptive", prompts, 100, FlowRoom(8192, 8), FlowRoom(170, 64))
    assert r.generation == ["s1", "s2"] and r.context == ["s3"]


def test_prompts_wait_when_neither_flow_has_room() -> None:
    prompts = [Waiting("L1", 6000), Waiting("L2", 6000), Waiting("L3", 9000)]
    r = route_prompts("adaptive", prompts, 100, FlowRoom(8192, 8), FlowRoom(512, 64))
    assert r.context == ["L1"] and r.waiting == ["L2", "L3"]
    # a prompt longer than the whole context budget still starts when the plan is empty
    r = route_prompts("adaptive", [Waiting("XL", 20000)], 100, FlowRoom(8192, 8), FlowRoom(0, 0))
    assert r.context == ["XL"]


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive or fixed"):
        route_prompts("auto", [], 1, FlowRoom(1, 1), FlowRoom(1, 1))  # type: ignore[arg-type]


@given(
    lengths=st.lists(st.integers(1, 5000), max_size=30),
    threshold=st.integers(1, 600),
    ctx=st.tuples(st.integers(1, 9000), st.integers(1, 16)),
    gen=st.tuples(st.integers(0, 2000), st.integers(0, 64)),
)
def test_routing_partitions_in_order_within_budgets(lengths, threshold, ctx, gen) -> None:
    prompts = [Waiting(str(i), n) for i, n in enumerate(lengths)]
    r = route_prompts("adaptive", prompts, threshold, FlowRoom(*ctx), FlowRoom(*gen))
    ids = [p.request_id for p in prompts]
    assert sorted(r.context + r.generation + r.waiting, key=int) == ids
    for part in (r.context, r.generation, r.waiting):
        assert part == sorted(part, key=int)  # FCFS inside each destination
    size = {p.request_id: p.tokens for p in prompts}
    assert all(size[i] < threshold for i in r.generation)
    assert sum(size[i] for i in r.generation) <= gen[0] and len(r.generation) <= gen[1]
    assert len(r.context) <= ctx[1]
    if len(r.context) > 1:
        assert sum(size[i] for i in r.context[1:]) <= ctx[0]
