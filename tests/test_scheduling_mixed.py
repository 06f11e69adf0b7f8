"""SchedulerCore in mixed (chunked prefill) mode, driven by the real KV manager and a fake
engine whose tokens depend only on (request id, position)."""

from __future__ import annotations

import pytest
from scheduling_sim import Sim, expected_output, mixed, prompt

from greenroom.actors.scheduling import FlowBudget, RequestState, SchedulerCore
from greenroom.bus.messages import (
    KVAdmitted,
    KVStepResult,
    SampledToken,
    SamplingParams,
    StepResult,
    SubmitRequest,
)
from greenroom.config import SchedulerConfig


def steps_of(plans, rid):
    return [s.num_tokens for p in plans for s in p.steps if s.request_id == rid]


def news_of(plans, rid):
    return [n for p in plans for n in p.new if n.request_id == rid]


def test_chunked_prefill_covers_each_prompt_once_then_one_token_per_decode():
    sim = Sim(mixed(tokens=16, batch=4))
    for i, n in enumerate([37, 5, 20, 1, 16]):
        sim.submit(f"r{i}", prompt(i, n), max_tokens=6, ignore_eos=True)
    sim.run()
    for i, n in enumerate([37, 5, 20, 1, 16]):
        rid = f"r{i}"
        (new,) = news_of(sim.plans, rid)
        steps = steps_of(sim.plans, rid)
        chunks, total = [], 0
        while total < n - new.num_cached_tokens:
            chunks.append(steps.pop(0))
            total += chunks[-1]
        assert total == n - new.num_cached_tokens  # no chunk crosses the end of the prompt
        assert steps == [1] * len(steps) and len(steps) == 5  # 6 tokens: 1 from prefill
        assert sim.tokens[rid] == sim.expected(rid)[0]
    assert max(sum(s.num_tokens for s in p.steps) for p in sim.plans) == 16
    sim.drained()


def test_decodes_go_first_then_continuing_prefill_then_admissions():
    sim = Sim(mixed(tokens=10, batch=8), plans_in_flight=1)
    sim.submit("a", prompt(1, 3), max_tokens=8, ignore_eos=True)
    sim.iterate("mixed")
    sim.submit("b", prompt(2, 14), max_tokens=2, ignore_eos=True)
    sim.submit("c", prompt(3, 6), max_tokens=2, ignore_eos=True)
    sim.iterate("mixed")
    sim.iterate("mixed")
    p2, p3 = sim.plans[1], sim.plans[2]
    assert [(s.request_id, s.num_tokens) for s in p2.steps] == [("a", 1), ("b", 9)]
    assert [(s.request_id, s.num_tokens) for s in p3.steps] == [("a", 1), ("b", 5), ("c", 4)]
    sim.run()
    assert all(sim.tokens[r] == sim.expected(r)[0] for r in "abc")


def test_cached_prefix_is_never_recomputed():
    sim = Sim(mixed(tokens=64, batch=4))
    shared = prompt(7, 24)
    sim.submit("first", shared + [5, 6], max_tokens=3, ignore_eos=True)
    sim.iterate("mixed")  # the first plan is issued: its blocks are published as computed
    sim.submit("second", shared + [9], max_tokens=3, ignore_eos=True)
    sim.run()
    (new,) = news_of(sim.plans, "second")
    assert new.num_cached_tokens == 24
    assert steps_of(sim.plans, "second")[0] == 1
    assert sim.tokens["second"] == sim.expected("second")[0]
    assert sim.final["second"] == "length"


@pytest.mark.parametrize("plans_in_flight", [1, 2, 3])
def test_stops_on_max_tokens_stop_ids_eos_and_ignores_eos(plans_in_flight):
    sim = Sim(mixed(), vocab=5, plans_in_flight=plans_in_flight)
    # with 5 tokens EOS (0) comes soon; find requests whose closed-form output shows it
    eos_at = {}
    for i in range(40):
        out, _ = expected_output(f"q{i}", 8, SamplingParams(max_tokens=20, ignore_eos=True), 5, 256)
        if 0 in out[2:]:
            eos_at[f"q{i}"] = out.index(0)
    eos_rid, k = next(iter(eos_at.items()))
    sim.submit(eos_rid, prompt(0, 8), max_tokens=20)
    sim.submit("ign", prompt(0, 8), max_tokens=20, ignore_eos=True)
    sim.submit("len", prompt(0, 8), max_tokens=1, ignore_eos=True)
    stop_out, _ = expected_output("stp", 8, SamplingParams(max_tokens=20, ignore_eos=True), 5, 256)
    sim.submit("stp", prompt(0, 8), max_tokens=20, stop_token_ids=[stop_out[1]], ignore_eos=True)
    sim.run()
    assert sim.tokens[eos_rid][-1] == 0 and len(sim.tokens[eos_rid]) == k + 1
    assert sim.final[eos_rid] == "stop"
    assert len(sim.tokens["ign"]) == 20 and sim.final["ign"] == "length"
    assert len(sim.tokens["len"]) == 1 and sim.final["len"] == "length"
    assert sim.tokens["stp"] == stop_out[:2] and sim.final["stp"] == "stop"
    for rid in (eos_rid, "ign", "len", "stp"):
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    sim.drained()


def test_max_model_len_ends_with_length():
    sim = Sim(mixed(), max_model_len=20)
    sim.submit("r", prompt(1, 15), max_tokens=100, ignore_eos=True)
    sim.run()
    assert len(sim.tokens["r"]) == 5 and sim.final["r"] == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        sim.submit("too-long", prompt(1, 20))
    sim.submit("x", [1])
    with pytest.raises(ValueError, match="already"):
        sim.submit("x", [1])


def many(sim, n: int, plen: int, max_tokens: int) -> list[str]:
    rids = [f"r{i}" for i in range(n)]
    for i, rid in enumerate(rids):
        sim.submit(rid, prompt(i, plen + i % 5), max_tokens=max_tokens, ignore_eos=i % 3 == 0)
    return rids


def test_guaranteed_no_evict_never_preempts():
    sim = Sim(mixed(tokens=32, batch=8), num_blocks=24, capacity_policy="guaranteed_no_evict")
    rids = many(sim, 12, 10, 14)
    sim.run()
    assert sim.core.stats().get("preemptions", 0) == 0
    for rid in rids:
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    sim.drained()


@pytest.mark.parametrize("plans_in_flight", [1, 2])
def test_max_utilization_preempts_newest_and_outputs_match(plans_in_flight):
    sim = Sim(mixed(tokens=32, batch=8), num_blocks=24, plans_in_flight=plans_in_flight)
    rids = many(sim, 12, 10, 14)
    admitted_order = []
    preempted = []
    while True:
        running = [r for r in sim.core._running]
        before = sim.core.stats().get("preemptions", 0)
        if not sim.iterate("mixed"):
            break
        sim.check()
        admitted_order = [r for r in running if r not in admitted_order] + admitted_order
        if sim.core.stats().get("preemptions", 0) > before:
            gone = [r for r in running if sim.core.request_state(r) is RequestState.WAITING]
            preempted.extend(gone)
            # the victim is the newest running request at that moment
            assert gone and gone[-1] == running[-1]
    assert preempted
    for rid in rids:
        assert (sim.tokens[rid], sim.final[rid]) == sim.expected(rid)
    for rid in set(preempted):
        news = news_of(sim.plans, rid)
        assert len(news) >= 2  # re-admitted with a new prompt
        for ns in news[1:]:
            # the recompute prompt is the prompt plus every token generated so far
            original = prompt(int(rid[1:]), sim.prompts[rid])
            assert ns.prompt_token_ids == original + sim.tokens[rid][: ns.num_output_tokens]
    sim.drained()


def test_preempted_request_reports_preemptions_in_metrics():
    core = SchedulerCore(SchedulerConfig(), 4, 128, [0], [FlowBudget("mixed", 64, 8)])
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    for rid in ("a", "b"):
        core.submit(SubmitRequest(request_id=rid, prompt_token_ids=[1, 2, 3], sampling=sp))
    step = core.build_kv_step("mixed")
    admitted = [KVAdmitted(request_id=a.request_id, block_ids=[i + 1], num_cached_tokens=0)
                for i, a in enumerate(step.admit)]  # fmt: skip
    plan = core.apply_kv_result("mixed", KVStepResult(iteration=step.iteration, admitted=admitted))
    out = core.apply_step_result(
        "mixed",
        StepResult(iteration=plan.iteration, sampled=[SampledToken("a", 7), SampledToken("b", 8)]),
    )
    assert [d.token_ids for d in out.deltas] == [[7], [8]]
    # both decode at position 3, inside the first block; the next needs a block: b extends
    step = core.build_kv_step("mixed")
    assert not step.extend
    plan = core.apply_kv_result("mixed", KVStepResult(iteration=step.iteration))
    core.apply_step_result(
        "mixed",
        StepResult(iteration=plan.iteration, sampled=[SampledToken("a", 9), SampledToken("b", 9)]),
    )
    step = core.build_kv_step("mixed")
    assert [e.request_id for e in step.extend] == ["a", "b"]
    plan = core.apply_kv_result(
        "mixed",
        KVStepResult(iteration=step.iteration, extended={"a": [5]}, failed_extend=["b"]),
    )
    assert [s.request_id for s in plan.steps] == ["a"] and plan.finished == ["b"]
    assert plan.steps[0].new_block_ids == [5]
    assert core.request_state("b") is RequestState.WAITING
    step = core.build_kv_step("mixed")  # b's blocks go back, and a decodes ahead
    assert [f.request_id for f in step.free] == ["b"] and not step.admit
    assert step.free[0].output_token_ids == [8, 9]
    plan = core.apply_kv_result("mixed", KVStepResult(iteration=step.iteration))
    assert [s.request_id for s in plan.steps] == ["a"]
    step = core.build_kv_step("mixed")  # the free settled: b is admitted again
    (adm,) = step.admit
    assert adm.token_ids == [1, 2, 3, 8, 9]
    plan = core.apply_kv_result(
        "mixed",
        KVStepResult(
            iteration=step.iteration,
            admitted=[KVAdmitted(request_id="b", block_ids=[2, 3], num_cached_tokens=4)],
        ),
    )
    (new,) = plan.new
    assert new.num_output_tokens == 2 and new.num_cached_tokens == 4
    assert [(s.request_id, s.num_tokens) for s in plan.steps] == [("b", 1)]

    def result(iteration, **tokens):
        sampled = [SampledToken(r, t) for r, t in tokens.items()]
        return core.apply_step_result("mixed", StepResult(iteration=iteration, sampled=sampled))

    assert result(3, a=4).deltas[0].finish_reason is None
    (d,) = result(4, a=1).deltas
    assert d.finish_reason == "length" and d.metrics.preemptions == 0
    assert result(5, b=1).deltas[0].token_ids == [1]
    step = core.build_kv_step("mixed")
    plan = core.apply_kv_result("mixed", KVStepResult(iteration=step.iteration))
    (d,) = result(plan.iteration, b=2).deltas
    assert d.finish_reason == "length" and d.metrics.preemptions == 1
    assert d.metrics.num_output_tokens == 4


def test_cancel_in_waiting_prefill_and_decode_frees_once_nothing_is_in_flight():
    sim = Sim(mixed(tokens=8, batch=4), num_blocks=64)
    sim.submit("dec", prompt(1, 4), max_tokens=50, ignore_eos=True)
    sim.iterate("mixed")
    sim.submit("pre", prompt(2, 30), max_tokens=5, ignore_eos=True)
    sim.submit("wait", prompt(3, 30), max_tokens=5, ignore_eos=True)
    sim.build("mixed")
    sim.apply_kv("mixed")  # dec's decode and a chunk of pre; no budget left to admit wait
    state = sim.core.request_state
    assert state("dec") is RequestState.DECODE and state("pre") is RequestState.PREFILL
    assert state("wait") is RequestState.WAITING
    assert sim.core.inflight("mixed") == 2
    sim.cancel(["wait", "pre", "dec"])
    assert all(sim.final[r] == "abort" for r in ("wait", "pre", "dec"))
    assert sim.kv.holds("dec") and sim.kv.holds("pre")  # plans in flight still use the blocks
    assert not sim.core.has_work("mixed")
    sim.run_engine("mixed")
    sim.apply_step("mixed")
    assert not sim.core.has_work("mixed")  # the second plan in flight still holds both
    sim.run_engine("mixed")
    sim.apply_step("mixed")
    step = sim.core.build_kv_step("mixed")
    assert sorted(f.request_id for f in step.free) == ["dec", "pre"]
    sim.kv_results["mixed"] = sim.kv.step(step)
    assert sim.apply_kv("mixed") is None
    assert not sim.kv.holds("dec") and not sim.kv.holds("pre")
    sim.drained()
    tokens_after = {r: list(t) for r, t in sim.tokens.items()}
    sim.cancel(["dec", "unknown"])  # already gone: nothing happens
    assert sim.tokens == tokens_after


def test_cancel_with_another_reason_is_an_error():
    sim = Sim(mixed())
    sim.submit("a", prompt(1, 5))
    sim.cancel(["a"], "timeout")
    assert sim.final["a"] == "error:timeout"
    sim.submit("b", prompt(1, 5))
    sim.cancel(["b"], "client went away")
    assert sim.final["b"] == "error:aborted"


def test_free_waits_for_the_second_plan_in_flight():
    sim = Sim(mixed(), vocab=64)
    first = expected_output("r", 6, SamplingParams(ignore_eos=True), 64, 256)[0][0]
    sim.submit("r", prompt(1, 6), max_tokens=30, stop_token_ids=[first], ignore_eos=True)
    sim.submit("long", prompt(2, 6), max_tokens=30, ignore_eos=True)
    sim.build("mixed"), sim.apply_kv("mixed")  # plan 1: prefill, samples the stop token
    sim.build("mixed"), sim.apply_kv("mixed")  # plan 2, built ahead: decodes it
    assert steps_of(sim.plans, "r") == [6, 1]
    sim.run_engine("mixed"), sim.run_engine("mixed")
    sim.apply_step("mixed")
    assert sim.final["r"] == "stop" and sim.tokens["r"] == [first]
    step = sim.core.build_kv_step("mixed")
    assert "r" not in [f.request_id for f in step.free]  # plan 2 still holds r
    assert step.extend == [] or all(e.request_id != "r" for e in step.extend)
    sim.kv_results["mixed"] = sim.kv.step(step)
    plan3 = sim.apply_kv("mixed")
    assert plan3.finished == ["r"] and "r" not in [s.request_id for s in plan3.steps]
    sim.apply_step("mixed")  # plan 2 comes back: its token for r is dropped
    assert sim.tokens["r"] == [first]
    step = sim.core.build_kv_step("mixed")
    assert [f.request_id for f in step.free] == ["r"]
    sim.kv_results["mixed"] = sim.kv.step(step)
    sim.apply_kv("mixed")
    assert not sim.kv.holds("r")
    sim.run()
    sim.drained()


def test_finished_request_stays_held_by_the_plan_built_ahead():
    sim = Sim(mixed(), vocab=64)
    sim.submit("r", prompt(1, 6), max_tokens=30, stop_token_ids=[], ignore_eos=True)
    sim.build("mixed"), sim.apply_kv("mixed")
    sim.build("mixed"), sim.apply_kv("mixed")
    sim.run_engine("mixed")
    sim.apply_step("mixed")  # token 1 arrives while plan 2 (decoding it) is in flight
    sim.cancel(["r"])
    step = sim.core.build_kv_step("mixed")
    assert step is None  # nothing to free yet: plan 2 still writes r's blocks
    assert sim.kv.holds("r")
    sim.run_engine("mixed")
    sim.apply_step("mixed")  # plan 2's token for r is dropped
    assert sim.tokens["r"] == sim.expected("r")[0][:1] and sim.final["r"] == "abort"
    step = sim.core.build_kv_step("mixed")
    assert [f.request_id for f in step.free] == ["r"]


def test_engine_crash_fails_requests_in_its_plans_and_frees_their_blocks():
    sim = Sim(mixed(tokens=16))
    sim.submit("a", prompt(1, 6), max_tokens=10, ignore_eos=True)
    sim.submit("b", prompt(2, 30), max_tokens=10, ignore_eos=True)
    sim.iterate("mixed")
    sim.submit("c", prompt(3, 6), max_tokens=10, ignore_eos=True)
    out = sim.core.fail_inflight("mixed", "the engine crashed")
    sim.record(out)
    assert {e.request_id for e in out.errors} == {"a", "b"}
    assert all(e.kind == "failed" for e in out.errors)
    assert sim.core.inflight("mixed") == 0
    sim.queued["mixed"].clear()
    sim.results["mixed"].clear()
    sim.engines["mixed"].seqs.clear()  # a restarted engine knows nothing
    step = sim.core.build_kv_step("mixed")
    assert {f.request_id for f in step.free} == {"a", "b"}
    assert all(f.output_token_ids == [] for f in step.free)
    sim.kv_results["mixed"] = sim.kv.step(step)
    sim.apply_kv("mixed")
    sim.run()
    assert sim.tokens["c"] == sim.expected("c")[0]
    sim.drained()


def test_fail_all_ends_every_request_and_returns_every_block():
    sim = Sim(mixed(tokens=16))
    for i in range(6):
        sim.submit(f"r{i}", prompt(i, 12), max_tokens=10, ignore_eos=True)
    sim.iterate("mixed")
    sim.iterate("mixed")
    sim.build("mixed")  # a KVStep is out when the node shuts down
    sim.record(sim.core.fail_all("shutting down"))
    assert set(sim.final) == {f"r{i}" for i in range(6)}
    assert all(v == "error:failed" for v in sim.final.values())
    sim.kv_results.clear()
    sim.queued["mixed"].clear()
    sim.results["mixed"].clear()
    while sim.build("mixed"):
        assert sim.apply_kv("mixed") is None
    assert sim.core.num_active == 0 and sim.core.num_waiting == 0


def test_a_prompt_that_can_never_fit_fails():
    sim = Sim(mixed(tokens=256), num_blocks=6)  # 5 usable blocks of 4 tokens
    sim.submit("big", prompt(1, 40), max_tokens=2)
    sim.submit("small", prompt(2, 6), max_tokens=2, ignore_eos=True)
    sim.run()
    assert sim.final["big"] == "error:failed" and "do not fit" in sim.errors["big"]
    assert sim.tokens["small"] == sim.expected("small")[0]


def test_host_tier_copies_ride_on_the_plan_of_their_iteration():
    sim = Sim(mixed(tokens=32), num_blocks=20, host_blocks=32, plans_in_flight=2)
    system = prompt(9, 16)
    sim.submit("early", system + [1, 2], max_tokens=4, ignore_eos=True)
    sim.run()
    for i in range(3):  # other prompts push the system prompt's blocks out to the host tier
        sim.submit(f"r{i}", prompt(i, 25), max_tokens=4, ignore_eos=True)
    sim.run()
    sim.submit("late", system + [3, 4], max_tokens=4, ignore_eos=True)
    sim.run()
    assert any(c.kind == "offload" for p in sim.plans for c in p.copies)
    assert any(c.kind == "onboard" for p in sim.plans for c in p.copies)
    (new,) = news_of(sim.plans, "late")
    assert new.num_cached_tokens == 16
    for rid in sim.prompts:
        assert sim.tokens[rid] == sim.expected(rid)[0]
    sim.drained()


def test_a_rejected_queue_head_is_retried_alone():
    # later candidates' prefix claims can crowd out the head; alone it fits
    sim = Sim(
        mixed(tokens=40, batch=4),
        num_blocks=8,
        capacity_policy="guaranteed_no_evict",
        max_num_active_requests=2,
    )
    sim.submit("warm", [42] * 11 + [1], max_tokens=1)
    sim.run()
    sim.submit("big", prompt(5, 16), max_tokens=5, ignore_eos=True)
    sim.submit("small", [42] * 11 + [2], max_tokens=1, ignore_eos=True)
    admits = []
    orig = sim.kv.step

    def spy(step):
        result = orig(step)
        if step.admit:
            admits.append(([a.request_id for a in step.admit], result.rejected))
        return result

    sim.kv.step = spy
    sim.run()
    assert admits[0] == (["big", "small"], ["big", "small"])
    assert admits[1] == (["big"], [])
    assert sim.tokens["big"] == sim.expected("big")[0]
    assert sim.tokens["small"] == sim.expected("small")[0]
    sim.drained()


def test_an_engine_error_fails_the_requests_of_that_plan():
    sim = Sim(mixed(tokens=64), plans_in_flight=1)
    sim.submit("a", prompt(1, 6), max_tokens=5, ignore_eos=True)
    sim.iterate("mixed")
    sim.submit("b", prompt(2, 6), max_tokens=5, ignore_eos=True)
    sim.build("mixed")
    plan = sim.apply_kv("mixed")
    assert {s.request_id for s in plan.steps} == {"a", "b"}
    sim.queued["mixed"].clear()
    sim.record(
        sim.core.apply_step_result(
            "mixed", StepResult(iteration=plan.iteration, error="out of memory")
        )
    )
    assert sim.final == {"a": "error:failed", "b": "error:failed"}
    assert "out of memory" in sim.errors["a"]
    sim.run()
    sim.drained()


def test_a_request_admitted_in_the_step_whose_extend_failed_is_the_victim():
    core = SchedulerCore(SchedulerConfig(), 4, 128, [0], [FlowBudget("mixed", 64, 8)])
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    core.submit(SubmitRequest(request_id="r", prompt_token_ids=[1, 2, 3, 4], sampling=sp))
    step = core.build_kv_step("mixed")
    adm = KVAdmitted(request_id="r", block_ids=[1], num_cached_tokens=0)
    plan = core.apply_kv_result("mixed", KVStepResult(iteration=1, admitted=[adm]))
    core.apply_step_result("mixed", StepResult(iteration=1, sampled=[SampledToken("r", 5)]))
    core.submit(SubmitRequest(request_id="s", prompt_token_ids=[6, 7], sampling=sp))
    step = core.build_kv_step("mixed")
    assert [e.request_id for e in step.extend] == ["r"] and [a.request_id for a in step.admit] == [
        "s"
    ]
    adm = KVAdmitted(request_id="s", block_ids=[2], num_cached_tokens=0)
    plan = core.apply_kv_result(
        "mixed", KVStepResult(iteration=step.iteration, admitted=[adm], failed_extend=["r"])
    )
    assert plan is None  # r could not grow and s, the newest, was preempted at once
    assert core.request_state("s") is RequestState.WAITING
    step = core.build_kv_step("mixed")
    assert [f.request_id for f in step.free] == ["s"] and not step.admit
    assert [e.request_id for e in step.extend] == ["r"]
    plan = core.apply_kv_result(
        "mixed", KVStepResult(iteration=step.iteration, extended={"r": [2]})
    )
    assert [(s.request_id, s.new_block_ids) for s in plan.steps] == [("r", [2])]
    step = core.build_kv_step("mixed")
    assert [a.request_id for a in step.admit] == ["s"]
