"""Penalties, logit bias and min_tokens against reference implementations.

Repetition penalty: transformers' RepetitionPenaltyLogitsProcessor (and greedy generate with
``repetition_penalty``); presence / frequency penalties: OpenAI's definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanExecutor
from greenroom.models.logits_adjust import LogitsAdjustments
from greenroom.models.sampling import SamplingBatch, sample
from greenroom.models.token_history import TokenHistory

V = 64


def histories(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    outputs = [
        torch.randint(0, V, (int(torch.randint(0, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
    return prompts, outputs


def adjusted(params, prompts, outputs, logits, eos=(), grow_history: bool = True):
    """Logits after LogitsAdjustments, with the history built incrementally token by token."""
    history = TokenHistory(V, "cpu", capacity=1)  # grows while rows are added
    slots = [
        history.add(p, []) if s.has_penalties else -1 for s, p in zip(params, prompts, strict=True)
    ]
    for i, out in enumerate(outputs):
        if slots[i] >= 0 and grow_history:
            for t in out:
                history.record(torch.tensor([slots[i]]), torch.tensor([t]))
    adj = LogitsAdjustments.build(
        params, [len(o) for o in outputs], slots, list(eos), history, "cpu"
    )
    return adj.apply(logits) if adj is not None else logits


@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_matches_transformers(seed: int) -> None:
    prompts, outputs = histories(6, seed)
    logits = 3.0 * torch.randn(6, V, generator=torch.Generator().manual_seed(seed))
    penalties = [1.0, 1.3, 0.7, 2.0, 1.0, 1.15]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    got = adjusted(params, prompts, outputs, logits)
    for row, p in enumerate(penalties):
        ids = torch.tensor([prompts[row] + outputs[row]])
        ref = RepetitionPenaltyLogitsProcessor(p)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(got[row], ref[0])


def test_presence_and_frequency_penalties_as_openai_defines_them() -> None:
    prompts, outputs = histories(5, 7)
    outputs[0] = [3, 3, 3, 9]
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
        SamplingParams(frequency_penalty=2.0, repetition_penalty=1.2),
        SamplingParams(),
        SamplingParams(presence_penalty=1.5, frequency_penalty=-0.5),
    ]
    got = adjusted(params, prompts, outputs, logits)
    for row, p in enumerate(params):
        ref = logits[row].clone()
        if p.repetition_penalty != 1.0:
            ids = torch.tensor([prompts[row] + outputs[row]])
            ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, ref[None])[0]
        for token in set(outputs[row]):  # only generated tokens count (not the prompt)
            count = outputs[row].count(token)
            ref[token] -= count * p.frequency_penalty + p.presence_penalty
        torch.testing.assert_close(got[row], ref)
    assert got[0, 3] == pytest.approx(logits[0, 3].item() - 3 * 0.25 - 0.5)


def test_logit_bias_and_min_tokens_mask() -> None:
    logits = torch.zeros(3, V)
    params = [
        SamplingParams(logit_bias={5: 100.0, 6: -100.0}),
        SamplingParams(min_tokens=3, stop_token_ids=[7]),
        SamplingParams(min_tokens=3, stop_token_ids=[7], ignore_eos=True),
    ]
    got = adjusted(params, [[1]] * 3, [[], [2, 2], [2]], logits, eos=[0])
    assert got[0, 5] == 100.0 and got[0, 6] == -100.0 and got[0].abs().sum() == 200.0
    assert math.isinf(got[1, 0]) and math.isinf(got[1, 7]) and got[1, 1:7].eq(0).all()
    assert got[2, 0] == 0 and math.isinf(got[2, 7])
    # once min_tokens outputs are out, nothing is masked
    after = adjusted(params[1:2], [[1]], [[2, 2, 2]], logits[:1], eos=[0])
    assert after.eq(0).all()


def test_no_option_builds_nothing_and_greedy_is_unchanged() -> None:
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5, seed=3)]
    assert LogitsAdjustments.build(params, [0, 4], [-1, -1], [0], None, "cpu") is None
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    batch = SamplingBatch.build(params, [1, 3], [0, 4], "cpu")
    assert batch.adjustments is None
    assert sample(logits, batch).token_ids[0] == logits[0].argmax()


def test_history_grows_and_reuses_rows() -> None:
    h = TokenHistory(V, "cpu", capacity=1)
    a = h.add([1, 2], [3, 3])
    b = h.add([4], [])
    assert h.capacity >= 2 and h.output_counts[a, 3] == 2 and h.prompt_seen[a, 2]
    h.record(torch.tensor([a, b, a]), torch.tensor([3, 5, 9]))
    assert h.output_counts[a, 3] == 3 and h.output_counts[b, 5] == 1 and h.output_counts[a, 9] == 1
    h.remove(a)
    c = h.add([], [8])
    assert c == a and h.output_counts[c].sum() == 1 and not h.prompt_seen[c].any()


# ------------------------------------------------------------------ engine against transformers

BS = 16
PROMPT = [5, 17, 300, 42, 7, 99, 101, 3, 8, 200, 11, 12, 13]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ModelConfig(), KVConfig(tokens_per_block=BS, num_blocks=32), None, "cpu")


def run(ex: PlanExecutor, rids: list[str], params: list[SamplingParams], steps: int):
    """Prefill every request in one plan, then decode them together."""
    new = [
        NewSequence(
            request_id=rid,
            prompt_token_ids=PROMPT,
            sampling=p,
            num_cached_tokens=0,
            block_ids=[1 + 3 * i, 2 + 3 * i, 3 + 3 * i],
        )
        for i, (rid, p) in enumerate(zip(rids, params, strict=True))
    ]
    plan = StepPlan(iteration=0, new=new, steps=[SequenceStep(r, len(PROMPT)) for r in rids])
    out: dict[str, list[int]] = {r: [] for r in rids}
    for i in range(steps):
        for s in ex.execute(plan).sampled:
            out[s.request_id].append(s.token_id)
        plan = StepPlan(iteration=i + 1, steps=[SequenceStep(r, 1) for r in rids])
    return out


def test_engine_greedy_with_repetition_penalty_matches_transformers_generate(runner) -> None:
    from transformers import AutoModelForCausalLM

    from greenroom.models.tiny import tiny_llama_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), torch_dtype=torch.float32)
    ref = model.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=10,
        do_sample=False,
        repetition_penalty=1.5,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(PROMPT) :].tolist()
    plain = SamplingParams(max_tokens=10, ignore_eos=True)
    penalised = SamplingParams(max_tokens=10, ignore_eos=True, repetition_penalty=1.5)
    # the same batch mixes a request without options: its tokens stay the plain greedy ones
    ex = PlanExecutor(runner, graphs="none")
    got = run(ex, ["pen", "plain"], [penalised, plain], 10)
    assert got["pen"] == ref
    assert got["plain"] == run(PlanExecutor(runner, graphs="none"), ["x"], [plain], 10)["x"]
    assert got["pen"] != got["plain"]
    assert ex.history is not None and ex.history.num_used == 1
    ex.execute(StepPlan(iteration=99, finished=["pen", "plain"]))
    assert ex.history.num_used == 0


def test_engine_penalty_history_survives_preemption(runner) -> None:
    """A request recomputed with its outputs in the prompt keeps counting them as outputs."""
    p = SamplingParams(
        max_tokens=12, ignore_eos=True, frequency_penalty=-2.0, presence_penalty=-2.0
    )
    full = run(PlanExecutor(runner, graphs="none"), ["a"], [p], 12)["a"]
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    assert full != run(PlanExecutor(runner, graphs="none"), ["a"], [plain], 12)["a"]
    ex = PlanExecutor(runner, graphs="none")
    resumed = NewSequence(
        request_id="a",
        prompt_token_ids=PROMPT + full[:5],
        sampling=p,
        num_cached_tokens=0,
        block_ids=[4, 5],
        num_output_tokens=5,
    )
    plan = StepPlan(iteration=0, new=[resumed], steps=[SequenceStep("a", len(PROMPT) + 5)])
    rest = []
    for i in range(7):
        rest.append(ex.execute(plan).sampled[0].token_id)
        plan = StepPlan(iteration=i + 1, steps=[SequenceStep("a", 1)])
    assert rest == full[5:]
