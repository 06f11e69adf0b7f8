"""SchedulerCore with two flows (SM-level disaggregation): context plans prefill, generation
plans decode, requests move between them on the context result that samples their first token.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduling_sim import Sim, mixed, prompt, run_random_interleaving, two_flows

from greenroom.actors.scheduling import RequestState


def plans_of(sim, flow):
    return [p for p in sim.plans if p.flow == flow]


def test_handoff_streams_the_first_token_once_and_carries_the_event():
    sim = Sim(two_flows(ctx=8))
    p = prompt(1, 19)
    sim.submit("r", p, max_tokens=5, ignore_eos=True)
    while not sim.tokens["r"]:
        sim.iterate("context")
    first = sim.expected("r")[0][0]
    assert sim.tokens["r"] == [first]  # streamed on the context result, before any decode
    assert not plans_of(sim, "generation")
    assert sim.core.stats()["running"] == {"generation": 1}
    sim.run()
    assert sim.tokens["r"] == sim.expected("r")[0]
    ctx, gen = plans_of(sim, "context"), plans_of(sim, "generation")
    assert [s.num_tokens for p_ in ctx for s in p_.steps] == [8, 8, 3]
    (new,) = [n for p_ in gen for n in p_.new]
    assert new.prompt_token_ids == p + [first]
    assert new.num_cached_tokens == 19 and new.num_output_tokens == 1
    assert new.handoff_event_id == sim.engines["context"].handoff_ids["r"] != 0
    assert [s.num_tokens for p_ in gen for s in p_.steps] == [1, 1, 1, 1]
    assert not any(p_.finished for p_ in ctx)
    sim.submit("next", prompt(2, 4), max_tokens=2)
    sim.run()
    # the context engine forgets r with its next plan
    assert plans_of(sim, "context")[-1].finished == ["r"]
    sim.drained()


def test_context_plans_only_prefill_and_generation_plans_only_decode():
    sim = Sim(two_flows(ctx=16, ctx_batch=3, gen=4, gen_batch=4))
    lens = [3, 30, 9, 17, 1, 12, 25]
    for i, n in enumerate(lens):
        sim.submit(f"r{i}", prompt(i, n), max_tokens=6, ignore_eos=i % 2 == 0)
    sim.run()
    for i, n in enumerate(lens):
        rid = f"r{i}"
        ctx_new = [x for p in plans_of(sim, "context") for x in p.new if x.request_id == rid]
        ctx_steps = [s.num_tokens for p in plans_of(sim, "context") for s in p.steps
                     if s.request_id == rid]  # fmt: skip
        gen_steps = [s.num_tokens for p in plans_of(sim, "generation") for s in p.steps
                     if s.request_id == rid]  # fmt: skip
        assert sum(ctx_steps) == n - ctx_new[0].num_cached_tokens
        assert set(gen_steps) <= {1}
        # a stop token can only be seen after the plan built ahead decoded it too
        extra = len(gen_steps) - (len(sim.tokens[rid]) - 1)
        assert extra == 0 or (extra == 1 and sim.final[rid] == "stop")
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    assert all(len(p.steps) <= 3 and sum(s.num_tokens for s in p.steps) <= 16
               for p in plans_of(sim, "context"))  # fmt: skip
    assert all(len(p.steps) <= 4 for p in plans_of(sim, "generation"))
    sim.drained()


def test_no_admission_and_no_extend_in_the_generation_flow():
    sim = Sim(two_flows())
    for i in range(4):
        sim.submit(f"r{i}", prompt(i, 6), max_tokens=12, ignore_eos=True)
    steps = []
    orig = sim.core.build_kv_step

    def spy(flow):
        step = orig(flow)
        if step is not None:
            steps.append((flow, step))
        return step

    sim.core.build_kv_step = spy
    sim.run()
    assert any(s.admit for f, s in steps if f == "context")
    assert not any(s.admit for f, s in steps if f == "generation")
    assert any(s.extend for f, s in steps if f == "generation")
    assert not any(s.extend for f, s in steps if f == "context")


def test_two_flows_stream_what_the_mixed_flow_streams():
    def workload(sim):
        for i in range(10):
            sim.submit(f"r{i}", prompt(i % 4, 5 + 3 * i), max_tokens=3 + i, ignore_eos=i % 3 == 0)

    one, two = Sim(mixed(tokens=24), vocab=16), Sim(two_flows(ctx=24), vocab=16)
    workload(one)
    workload(two)
    one.run()
    two.run()
    assert one.tokens == two.tokens and one.final == two.final
    assert all((two.tokens[r], two.final[r]) == two.expected(r) for r in two.prompts)
    two.drained()


def test_active_cap_counts_requests_of_both_flows_and_in_handoff():
    sim = Sim(two_flows(ctx=64, ctx_batch=8), max_num_active_requests=3)
    for i in range(8):
        sim.submit(f"r{i}", prompt(i, 6), max_tokens=8, ignore_eos=True)
    seen = 0
    for _ in range(200):
        for flow in ("context", "generation"):
            sim.iterate(flow)
            sim.check()
            seen = max(seen, sim.core.num_active)
            running = sim.core.stats()["running"]
            assert sum(running.values()) <= 3
    assert seen == 3
    assert all(sim.tokens[f"r{i}"] == sim.expected(f"r{i}")[0] for i in range(8))
    sim.drained()


def test_cancel_between_context_result_and_first_generation_plan():
    sim = Sim(two_flows())
    sim.submit("r", prompt(1, 6), max_tokens=8, ignore_eos=True)
    while not sim.tokens["r"]:
        sim.iterate("context")
    assert sim.core.request_state("r") is RequestState.DECODE
    assert sim.core.inflight("context") == 0 and sim.kv.holds("r")
    sim.cancel(["r"])
    assert sim.final["r"] == "abort"
    assert sim.core.has_work("generation")  # the free can go with either flow's step
    sim.run()
    assert not plans_of(sim, "generation")
    assert not sim.kv.holds("r")
    sim.drained()


def test_generation_flow_preempts_on_extend_failure_and_outputs_survive():
    sim = Sim(two_flows(ctx=32, ctx_batch=4, gen=8, gen_batch=8), num_blocks=20)
    for i in range(10):
        sim.submit(f"r{i}", prompt(i, 9 + i), max_tokens=16, ignore_eos=True)
    sim.run()
    assert sim.core.stats().get("preemptions", 0) > 0
    for i in range(10):
        rid = f"r{i}"
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    sim.drained()


# ------------------------------------------------------------------ random interleavings


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    num_blocks=st.integers(6, 24),
    cap=st.integers(2, 8),
    ctx=st.tuples(st.integers(1, 24), st.integers(1, 4)),
    gen=st.tuples(st.integers(1, 8), st.integers(1, 6)),
    policy=st.sampled_from(["max_utilization", "guaranteed_no_evict"]),
    in_flight=st.integers(1, 3),
)
def test_random_interleavings_of_the_two_flows(data, num_blocks, cap, ctx, gen, policy, in_flight):
    sim = Sim(
        two_flows(ctx[0], ctx[1], gen[0], gen[1]),
        num_blocks=num_blocks,
        vocab=12,
        max_model_len=64,
        max_num_active_requests=cap,
        capacity_policy=policy,
        plans_in_flight=in_flight,
    )
    run_random_interleaving(sim, data, num_blocks, in_flight)
    if policy == "guaranteed_no_evict":
        assert sim.core.stats().get("preemptions", 0) == 0
    sim.drained()
