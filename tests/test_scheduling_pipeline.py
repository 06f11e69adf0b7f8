"""The scheduler core under pipeline parallelism: disjoint micro-batches, up to ``pp_depth`` in
flight, results applied in any order, and issuing never waits on a result."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduling_sim import PipelineSim, mixed, prompt

SHARED = [40 + i % 7 for i in range(12)]


def submit_mix(sim: PipelineSim, n: int, max_tokens: int = 6, name: str = "r") -> None:
    for i in range(n):
        head = SHARED if i % 2 else []
        sim.submit(
            f"{name}{i}", head + prompt(i, 5 + 3 * i), max_tokens=max_tokens, ignore_eos=True
        )


def assert_outputs(sim: PipelineSim) -> None:
    for rid in sim.prompts:
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid), rid


def test_pipelined_outputs_match_with_chunked_prefill_prefix_reuse_and_host_tier() -> None:
    for stages, depth in ((2, 2), (3, 3), (3, 5)):
        sim = PipelineSim(mixed(tokens=12, batch=3), stages, depth, num_blocks=20, host_blocks=32)
        submit_mix(sim, 7)
        sim.run()
        submit_mix(sim, 3, name="again")  # prefix reuse, host-tier onboarding
        for i in range(3):
            sim.submit(f"late{i}", SHARED + prompt(i, 4), max_tokens=4, ignore_eos=True)
        sim.run()
        assert_outputs(sim)
        sim.drained()
        assert 2 <= sim.max_inflight <= depth
        assert all(st.ran == sim.stages[0].ran for st in sim.stages)


def test_stage_zero_runs_pp_depth_micro_batches_while_results_are_held() -> None:
    depth = 3
    sim = PipelineSim(mixed(tokens=64, batch=2), stages=2, depth=depth)
    for i in range(8):
        sim.submit(f"r{i}", prompt(i, 6), max_tokens=4, ignore_eos=True)
    assert sim.issue() == depth  # no result has come back
    while sim.advance(0):
        pass
    assert len(sim.stages[0].ran) == depth
    while sim.advance(1):
        pass
    assert len(sim.done) == depth
    # the held results come back newest first: each frees its own requests at once
    sim.deliver(-1)
    assert sim.issue() == 1
    newest = {e.request.request_id for e in sim.core._inflight["mixed"][-1].entries}
    assert newest & {"r4", "r5"} or newest & {"r6", "r7"}
    sim.run()
    assert_outputs(sim)
    sim.drained()


def test_a_request_waits_for_its_result_but_others_go_on() -> None:
    sim = PipelineSim(mixed(tokens=64, batch=1), stages=2, depth=2)
    sim.submit("a", prompt(1, 5), max_tokens=3, ignore_eos=True)
    assert sim.issue() == 1  # a's only micro-batch; nothing else to build
    assert not sim.core.has_work("mixed")
    sim.submit("b", prompt(2, 5), max_tokens=3, ignore_eos=True)
    assert sim.issue() == 1  # b goes in beside a, without a's result
    ids = [[e.request.request_id for e in p.entries] for p in sim.core._inflight["mixed"]]
    assert ids == [["a"], ["b"]]
    sim.run()
    assert_outputs(sim)


action = st.one_of(
    st.tuples(st.just("issue"), st.just(0)),
    st.tuples(st.just("advance"), st.integers(0, 3)),
    st.tuples(st.just("deliver"), st.integers(0, 7)),
    st.tuples(st.just("submit"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(action, min_size=10, max_size=120),
    stages=st.integers(2, 4),
    extra_depth=st.integers(0, 2),
    max_num_tokens=st.integers(2, 24),
    max_batch_size=st.integers(1, 4),
    num_blocks=st.integers(10, 30),
    host_blocks=st.sampled_from([0, 16]),
)
def test_no_deadlock_and_exact_outputs_under_random_delays(
    actions, stages, extra_depth, max_num_tokens, max_batch_size, num_blocks, host_blocks
):
    depth = stages + extra_depth
    sim = PipelineSim(
        mixed(max_num_tokens, max_batch_size),
        stages,
        depth,
        num_blocks=num_blocks,
        host_blocks=host_blocks,
        vocab=24,
        max_model_len=48,
    )
    cancelled: set[str] = set()
    submitted = 0
    for kind, arg in actions:
        if kind == "issue":
            sim.issue()
        elif kind == "advance":
            sim.advance(arg % stages)
        elif kind == "deliver":
            sim.deliver(arg)
        elif kind == "submit" and (len(SHARED) + 4) * 2 < (num_blocks - 1) * 4:
            head = SHARED if arg % 3 == 0 else []
            sim.submit(f"r{submitted}", head + prompt(arg, 1 + arg % 9), max_tokens=1 + arg % 7)
            submitted += 1
        elif kind == "cancel" and submitted:
            rid = f"r{arg % submitted}"
            if rid not in sim.final:
                cancelled.add(rid)
                sim.cancel([rid])
        sim.check()
    sim.run()
    for rid in sim.prompts:
        expected, reason = sim.expected(rid)
        if rid in cancelled:
            assert sim.tokens[rid] == expected[: len(sim.tokens[rid])]
        else:
            assert (sim.tokens[rid], sim.final[rid]) == (expected, reason), rid
    sim.drained()
