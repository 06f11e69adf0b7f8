"""Adaptive SM-disaggregation routing wired through SchedulerCore: which prompts each flow
admits for given thresholds, budgets and queues, and that outputs never change."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduling_sim import Sim, mixed, prompt, run_random_interleaving, two_flows

from greenroom.actors.scheduling import FlowBudget, SchedulerCore
from greenroom.actors.scheduling.routing import PromptRouting
from greenroom.config import SchedulerConfig


def adaptive(threshold: int) -> PromptRouting:
    return PromptRouting("adaptive", threshold)


def admitted_by(sim: Sim, flow: str) -> list[str]:
    """Requests whose prompt ``flow`` prefilled (not those handed to it after a prefill)."""
    return [
        n.request_id for p in sim.plans if p.flow == flow for n in p.new if not n.num_output_tokens
    ]


def first_plan(sim: Sim, flow: str):
    assert sim.build(flow)
    return sim.apply_kv(flow)


def test_short_prompts_ride_in_generation_and_long_ones_batch_on_the_context_engine():
    sim = Sim(two_flows(ctx=64, ctx_batch=4, gen=16, gen_batch=8), routing=adaptive(10))
    for rid, n in (("s1", 5), ("L1", 20), ("s2", 3), ("L2", 25), ("s3", 9)):
        sim.submit(rid, prompt(len(rid) + n, n), max_tokens=4, ignore_eos=True)
    gen = first_plan(sim, "generation")
    ctx = first_plan(sim, "context")
    # the generation step carries the short prompts whole (5 + 3 + 9 > 16: s3 waits)
    assert [(s.request_id, s.num_tokens) for s in gen.steps] == [("s1", 5), ("s2", 3)]
    # one context plan batches both long prompts, FCFS
    assert [(s.request_id, s.num_tokens) for s in ctx.steps] == [("L1", 20), ("L2", 25)]
    sim.run()
    assert admitted_by(sim, "generation") == ["s1", "s2", "s3"]
    assert admitted_by(sim, "context") == ["L1", "L2"]
    assert sim.core.stats()["handoffs"] == 2 and sim.core.stats()["prompts_in_generation"] == 3
    for rid in sim.prompts:
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    sim.drained()


def test_a_short_prompt_goes_to_the_context_engine_when_decodes_fill_the_step():
    sim = Sim(two_flows(ctx=64, ctx_batch=4, gen=8, gen_batch=8), routing=adaptive(10))
    for i in range(6):
        sim.submit(f"d{i}", prompt(i, 1), max_tokens=30, ignore_eos=True)
    for _ in range(3):
        sim.iterate("generation")
    assert sim.core.stats()["running"] == {"generation": 6}
    # six decodes leave 2 tokens of the 8-token generation step: a 5-token prompt cannot
    # ride, and waiting for room would cost it more than one context plan
    sim.submit("s", prompt(9, 5), max_tokens=3, ignore_eos=True)
    ctx = first_plan(sim, "context")
    assert [(s.request_id, s.num_tokens) for s in ctx.steps] == [("s", 5)]
    sim.run()
    assert "s" in admitted_by(sim, "context") and "s" not in admitted_by(sim, "generation")
    assert (sim.tokens["s"], sim.final["s"]) == sim.expected("s")
    sim.drained()


def test_a_long_prompt_never_rides_in_generation_even_when_the_context_engine_is_busy():
    sim = Sim(two_flows(ctx=8, ctx_batch=1, gen=64, gen_batch=8), routing=adaptive(10))
    sim.submit("L1", prompt(1, 30), max_tokens=2, ignore_eos=True)
    sim.submit("L2", prompt(2, 12), max_tokens=2, ignore_eos=True)
    sim.submit("s", prompt(3, 4), max_tokens=2, ignore_eos=True)
    first_plan(sim, "context")  # L1's first chunk fills the context plan
    gen = first_plan(sim, "generation")
    assert [s.request_id for s in gen.steps] == ["s"]  # s overtakes the waiting L2
    sim.run()
    assert admitted_by(sim, "context") == ["L1", "L2"]
    sim.drained()


def test_a_long_prompt_rides_while_the_generation_flow_carries_nothing():
    routing = PromptRouting("adaptive", 10, ride_when_idle=True)
    sim = Sim(two_flows(ctx=64, ctx_batch=4, gen=64, gen_batch=8), routing=routing)
    sim.submit("L1", prompt(1, 30), max_tokens=3, ignore_eos=True)
    sim.submit("L2", prompt(2, 20), max_tokens=3, ignore_eos=True)
    gen = first_plan(sim, "generation")
    ctx = first_plan(sim, "context")
    # nothing to delay in the generation step: L1 rides whole; the step then carries it
    assert [(s.request_id, s.num_tokens) for s in gen.steps] == [("L1", 30)]
    assert [(s.request_id, s.num_tokens) for s in ctx.steps] == [("L2", 20)]
    sim.run()
    sim.submit("L3", prompt(3, 25), max_tokens=2, ignore_eos=True)  # idle again: rides
    sim.run()
    assert admitted_by(sim, "generation") == ["L1", "L3"]
    assert admitted_by(sim, "context") == ["L2"]
    for rid in sim.prompts:
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    sim.drained()


def test_fixed_policy_and_mixed_flow_admit_as_before():
    fixed = Sim(two_flows(), routing=PromptRouting("fixed", 1000))
    for i in range(4):
        fixed.submit(f"r{i}", prompt(i, 3), max_tokens=4, ignore_eos=True)
    fixed.run()
    assert admitted_by(fixed, "generation") == []
    assert "prompts_in_generation" not in fixed.core.stats()
    with pytest.raises(ValueError, match="context and generation flows"):
        SchedulerCore(SchedulerConfig(), 4, 64, [0], mixed(), routing=adaptive(8))


def test_active_cap_holds_while_both_flows_admit():
    sim = Sim(two_flows(ctx=64, ctx_batch=8, gen=64, gen_batch=8), routing=adaptive(8),
              max_num_active_requests=3)  # fmt: skip
    for i in range(10):
        sim.submit(f"r{i}", prompt(i, 3 if i % 2 else 12), max_tokens=5, ignore_eos=True)
    # both flows draft admissions before either KVStep comes back
    assert sim.build("context") and sim.build("generation")
    drafted = [r for d in sim.core._drafts.values() for r in d.admits]
    assert len(drafted) == 3 and len({r.request_id for r in drafted}) == 3
    sim.apply_kv("context")
    sim.apply_kv("generation")
    sim.run()
    assert all((sim.tokens[r], sim.final[r]) == sim.expected(r) for r in sim.prompts)
    sim.drained()


def test_budget_flag_is_only_for_the_generation_flow():
    with pytest.raises(ValueError, match="takes_prompts"):
        FlowBudget("context", 8, 2, takes_prompts=True)
    assert FlowBudget("generation", 8, 2, takes_prompts=True).admits
    assert not FlowBudget("generation", 8, 2).admits


def test_adaptive_streams_what_mixed_mode_streams():
    def workload(sim: Sim) -> None:
        for i in range(14):
            n = (2, 30, 5, 17, 1, 40, 9)[i % 7]
            sim.submit(f"r{i}", prompt(i % 5, n), max_tokens=2 + i, ignore_eos=i % 3 == 0)

    one = Sim(mixed(tokens=24), vocab=16)
    two = Sim(two_flows(ctx=24, gen=16), vocab=16, routing=adaptive(10))
    workload(one)
    workload(two)
    one.run()
    two.run()
    assert one.tokens == two.tokens and one.final == two.final
    assert two.core.stats()["prompts_in_generation"] > 0 and two.core.stats()["handoffs"] > 0
    two.drained()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    num_blocks=st.integers(6, 24),
    cap=st.integers(2, 8),
    threshold=st.integers(1, 24),
    ctx=st.tuples(st.integers(1, 24), st.integers(1, 4)),
    gen=st.tuples(st.integers(1, 24), st.integers(1, 6)),
    in_flight=st.integers(1, 3),
    ride_idle=st.booleans(),
)
def test_random_interleavings_under_adaptive_routing(
    data, num_blocks, cap, threshold, ctx, gen, in_flight, ride_idle
):
    sim = Sim(
        two_flows(ctx[0], ctx[1], gen[0], gen[1]),
        num_blocks=num_blocks,
        vocab=12,
        max_model_len=64,
        max_num_active_requests=cap,
        plans_in_flight=in_flight,
        routing=PromptRouting("adaptive", threshold, ride_when_idle=ride_idle),
    )
    lengths = run_random_interleaving(sim, data, num_blocks, in_flight)
    # a prompt at or above the threshold is never prefilled in the generation flow (unless
    # it may ride while that flow is idle)
    sizes = {f"r{i}": n for i, (n, _) in enumerate(lengths)}
    for plan in sim.plans:
        if plan.flow == "generation" and not ride_idle:
            assert all(
                sizes[n.request_id] < threshold for n in plan.new if n.num_output_tokens == 0
            )
    sim.drained()
