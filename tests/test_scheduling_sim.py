"""The fakes of tests/scheduling_sim.py catch bad plans: reads of unwritten KV, steps past the
known tokens or blocks; and the simulator streams the closed-form output."""

from __future__ import annotations

import pytest
from scheduling_sim import Sim, SimEngine, mixed

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan


def test_engine_rejects_a_read_of_unwritten_kv():
    pool: dict = {}
    eng = SimEngine("mixed", pool, {}, 4, 64)
    sp = SamplingParams()
    new = NewSequence(
        request_id="a", prompt_token_ids=[1, 2, 3, 4, 5], sampling=sp,
        num_cached_tokens=4, block_ids=[1, 2],
    )  # fmt: skip
    with pytest.raises(AssertionError, match="wrong KV"):
        eng.execute(StepPlan(iteration=1, new=[new], steps=[SequenceStep("a", 1)]))


def test_engine_rejects_a_step_past_the_known_tokens_or_blocks():
    eng = SimEngine("mixed", {}, {}, 4, 64)
    new = NewSequence(
        request_id="a", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(),
        num_cached_tokens=0, block_ids=[1],
    )  # fmt: skip
    eng.execute(StepPlan(iteration=1, new=[new], steps=[SequenceStep("a", 3)]))
    with pytest.raises(AssertionError):
        eng.execute(StepPlan(iteration=2, steps=[SequenceStep("a", 2)]))
    eng.execute(StepPlan(iteration=3, steps=[SequenceStep("a", 1)]))  # 4 tokens: block full
    with pytest.raises(AssertionError, match="block table"):
        eng.execute(StepPlan(iteration=4, steps=[SequenceStep("a", 1)]))


def test_sim_streams_the_closed_form_output():
    sim = Sim(mixed())
    sim.submit("r", list(range(1, 11)), max_tokens=5, ignore_eos=True)
    sim.run()
    assert sim.tokens["r"] == sim.expected("r")[0]
    assert sim.final["r"] == "length"
    sim.drained()
