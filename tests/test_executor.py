"""PlanExecutor semantics on the embedded tiny Llama (CPU)."""

from __future__ import annotations

import pytest
import torch

from greenroom.bus.messages import BlockCopy, NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanError, PlanExecutor

BS = 16
PROMPT = [5, 17, 300, 42, 7, 99, 101, 3, 8, 200, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 19 tokens
HOT = SamplingParams(max_tokens=64, temperature=1.0, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ModelConfig(), KVConfig(tokens_per_block=BS, num_blocks=32), None, "cpu")


def new_seq(
    rid: str,
    prompt: list[int],
    blocks: list[int],
    sampling: SamplingParams = HOT,
    num_cached_tokens: int = 0,
    num_output_tokens: int = 0,
) -> NewSequence:
    return NewSequence(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=sampling,
        num_cached_tokens=num_cached_tokens,
        block_ids=blocks,
        num_output_tokens=num_output_tokens,
    )


def generate(
    ex: PlanExecutor, rid: str, new: NewSequence, n: int, start_iter: int = 0
) -> list[int]:
    """Prefill in one step, then n - 1 decode steps (blocks pre-allocated in ``new``)."""
    todo = len(new.prompt_token_ids) - new.num_cached_tokens
    out = []
    plan = StepPlan(iteration=start_iter, new=[new], steps=[SequenceStep(rid, todo)])
    for i in range(n):
        result = ex.execute(plan)
        assert [s.request_id for s in result.sampled] == [rid]
        out.append(result.sampled[0].token_id)
        plan = StepPlan(iteration=start_iter + i + 1, steps=[SequenceStep(rid, 1)])
    return out


def test_seeded_request_recomputed_after_preemption_continues_identically(runner) -> None:
    ex = PlanExecutor(runner)
    full = generate(ex, "a", new_seq("a", PROMPT, [1, 2, 3]), 12)
    assert len(set(full)) > 2
    # preempted after 5 outputs: recomputed from scratch on another engine and other blocks
    other = PlanExecutor(runner)
    resumed = new_seq("a", PROMPT + full[:5], [7, 8, 9], num_output_tokens=5)
    assert generate(other, "a", resumed, 7) == full[5:]
    # handed over with its prompt KV cached (same engine, blocks kept): same tokens again
    ex.execute(StepPlan(iteration=100, finished=["a"]))
    handoff = new_seq(
        "a", PROMPT + full[:1], [1, 2, 3], num_cached_tokens=len(PROMPT), num_output_tokens=1
    )
    assert generate(ex, "a", handoff, 11, start_iter=101) == full[1:]


def test_unseeded_requests_are_reproducible_per_request_id(runner) -> None:
    warm = SamplingParams(max_tokens=8, temperature=1.0)
    a = generate(PlanExecutor(runner), "x", new_seq("x", PROMPT, [4, 5], sampling=warm), 8)
    b = generate(PlanExecutor(runner), "x", new_seq("x", PROMPT, [4, 5], sampling=warm), 8)
    assert a == b


def test_chunked_prompt_samples_only_when_complete(runner) -> None:
    ex = PlanExecutor(runner)
    first = ex.execute(
        StepPlan(iteration=0, new=[new_seq("c", PROMPT, [10])], steps=[SequenceStep("c", 10)])
    )
    assert first.sampled == [] and first.iteration == 0
    second = ex.execute(StepPlan(iteration=1, steps=[SequenceStep("c", 9, [11])]))
    assert len(second.sampled) == 1 and second.duration_s > 0
    one_shot = PlanExecutor(runner)
    ref = one_shot.execute(
        StepPlan(iteration=0, new=[new_seq("c", PROMPT, [12, 13])], steps=[SequenceStep("c", 19)])
    )
    assert second.sampled[0].token_id == ref.sampled[0].token_id


def test_logprobs_are_returned_for_sampled_tokens(runner) -> None:
    ex = PlanExecutor(runner)
    sp = SamplingParams(max_tokens=4, logprobs=3)
    res = ex.execute(
        StepPlan(
            iteration=0,
            new=[new_seq("l", PROMPT, [14, 15], sampling=sp)],
            steps=[SequenceStep("l", 19)],
        )
    )
    lp = res.sampled[0].logprobs
    assert lp is not None and len(lp.top_token_ids) == 3
    assert lp.top_token_ids[0] == res.sampled[0].token_id  # greedy: the top token
    assert lp.token_logprob == pytest.approx(lp.top_logprobs[0]) and lp.token_logprob < 0


def test_errors_name_the_request(runner) -> None:
    ex = PlanExecutor(runner)
    with pytest.raises(PlanError, match="unknown request 'ghost'"):
        ex.execute(StepPlan(iteration=0, steps=[SequenceStep("ghost", 1)]))
    with pytest.raises(PlanError, match="'b'.*exceed its block table"):
        ex.execute(
            StepPlan(iteration=1, new=[new_seq("b", PROMPT, [1])], steps=[SequenceStep("b", 19)])
        )
    with pytest.raises(PlanError, match="exceeds the 19 known tokens"):
        ex.execute(
            StepPlan(iteration=2, new=[new_seq("d", PROMPT, [1, 2])], steps=[SequenceStep("d", 20)])
        )
    with pytest.raises(PlanError, match="more than once"):
        ex.execute(
            StepPlan(
                iteration=3,
                new=[new_seq("e", PROMPT, [1, 2])],
                steps=[SequenceStep("e", 4), SequenceStep("e", 4)],
            )
        )
    with pytest.raises(PlanError, match="no host tier"):
        ex.execute(StepPlan(iteration=4, copies=[BlockCopy("offload", 1, 0)]))


def test_finished_sequences_are_forgotten(runner) -> None:
    ex = PlanExecutor(runner)
    ex.execute(
        StepPlan(iteration=0, new=[new_seq("f", PROMPT, [1, 2])], steps=[SequenceStep("f", 19)])
    )
    assert "f" in ex.sequences
    empty = ex.execute(StepPlan(iteration=1, finished=["f"]))
    assert empty.sampled == [] and "f" not in ex.sequences
    with pytest.raises(PlanError, match="unknown request 'f'"):
        ex.execute(StepPlan(iteration=2, steps=[SequenceStep("f", 1)]))


def test_offload_and_onboard_round_trip_through_the_host_tier(runner) -> None:
    ex = PlanExecutor(runner, host_blocks=4)
    greedy = SamplingParams(max_tokens=8)
    ref = generate(ex, "h", new_seq("h", PROMPT, [20, 21], sampling=greedy), 4)
    ex.execute(StepPlan(iteration=50, finished=["h"]))
    saved = runner.kv_pool[20].clone()
    ex.execute(StepPlan(iteration=51, copies=[BlockCopy("offload", 20, 3)]))
    runner.kv_pool[20].normal_()  # the GPU block is reused by someone else
    ex.execute(StepPlan(iteration=52, copies=[BlockCopy("onboard", 3, 22)]))
    assert torch.equal(runner.kv_pool[22], saved)
    # the prefix block now lives in block 22: reuse it as a cached prefix of 16 tokens
    cached = new_seq("h", PROMPT, [22, 23], sampling=greedy, num_cached_tokens=BS)
    assert generate(ex, "h", cached, 4, start_iter=53) == ref
    with pytest.raises(PlanError, match="out of range"):
        ex.execute(StepPlan(iteration=60, copies=[BlockCopy("onboard", 9, 1)]))
    with pytest.raises(PlanError, match="kind 'swap'"):
        ex.execute(StepPlan(iteration=61, copies=[BlockCopy("swap", 1, 1)]))


def test_mixed_batch_of_decode_and_prefill_steps(runner) -> None:
    ex = PlanExecutor(runner)
    greedy = SamplingParams(max_tokens=8)
    alone_a = generate(PlanExecutor(runner), "a", new_seq("a", PROMPT, [1, 2], sampling=greedy), 3)
    alone_b = generate(PlanExecutor(runner), "b", new_seq("b", PROMPT[:7], [3], sampling=greedy), 2)
    r0 = ex.execute(
        StepPlan(
            iteration=0,
            new=[new_seq("a", PROMPT, [1, 2], sampling=greedy)],
            steps=[SequenceStep("a", 19)],
        )
    )
    r1 = ex.execute(
        StepPlan(
            iteration=1,
            new=[new_seq("b", PROMPT[:7], [3], sampling=greedy)],
            steps=[SequenceStep("a", 1), SequenceStep("b", 7)],
        )
    )
    r2 = ex.execute(StepPlan(iteration=2, steps=[SequenceStep("b", 1), SequenceStep("a", 1)]))
    got = {s.request_id: [] for s in r1.sampled}
    for res in (r0, r1, r2):
        for s in res.sampled:
            got.setdefault(s.request_id, []).append(s.token_id)
    assert got == {"a": alone_a, "b": alone_b}


def test_launching_ahead_of_finish_gives_the_same_tokens(runner) -> None:
    """A plan launched before the previous plan's tokens were read takes them from the
    device: greedy and seeded tokens match plain steps, logprobs included."""
    greedy = SamplingParams(max_tokens=8)
    lp = SamplingParams(max_tokens=8, temperature=0.7, seed=3, logprobs=2)

    def plans() -> list[StepPlan]:
        out = [
            StepPlan(
                iteration=0,
                new=[
                    new_seq("g", PROMPT, [1, 2], sampling=greedy),
                    new_seq("h", PROMPT[:9], [3, 4], sampling=HOT),
                ],
                steps=[SequenceStep("g", 19), SequenceStep("h", 9)],
            ),
            StepPlan(
                iteration=1,
                new=[new_seq("l", PROMPT[:5], [5, 6], sampling=lp)],
                steps=[SequenceStep("g", 1), SequenceStep("h", 1), SequenceStep("l", 5)],
            ),
        ]
        for it in range(2, 8):
            steps = [SequenceStep(r, 1) for r in ("l", "g", "h")]
            out.append(StepPlan(iteration=it, steps=steps, finished=["g"] if it == 7 else []))
        return out

    plain = PlanExecutor(runner)
    want = [plain.execute(p) for p in plans()[:-1]]
    ex = PlanExecutor(runner)
    got, previous = [], None
    for plan in plans()[:-1]:
        launched = ex.launch(plan)
        if previous is not None:
            got.append(ex.finish(previous))
        previous = launched
    got.append(ex.finish(previous))
    assert [r.sampled for r in got] == [r.sampled for r in want]
    assert all(s.logprobs is not None for r in got for s in r.sampled if s.request_id == "l")
    assert ex.sequences["g"].tokens == plain.sequences["g"].tokens
    assert -1 not in ex.sequences["h"].tokens


def test_a_plan_cannot_read_a_token_no_step_sampled(runner) -> None:
    ex = PlanExecutor(runner)
    greedy = SamplingParams(max_tokens=8)
    first = ex.launch(
        StepPlan(
            iteration=0,
            new=[new_seq("g", PROMPT, [1, 2], sampling=greedy)],
            steps=[SequenceStep("g", 19)],
        )
    )
    ex._pending.clear()  # as if the launched step had been lost
    with pytest.raises(PlanError):
        ex.launch(StepPlan(iteration=1, steps=[SequenceStep("g", 1)]))
    ex.finish(first)


def test_a_mixed_batch_runs_its_decode_rows_in_the_decode_kernel(runner) -> None:
    from greenroom.models.batch import SequenceChunk

    chunks = [
        SequenceChunk([7], 20, [1, 2]),  # decode rows over cached (here: arbitrary) KV
        SequenceChunk([9], 3, [3]),
        SequenceChunk(PROMPT[:12], 5, [4, 5]),  # a prefill chunk after a cached prefix
        SequenceChunk([4], 0, [6]),  # a one-token chunk after a longer one stays in prefill
        SequenceChunk(PROMPT, 0, [7, 8]),
    ]
    batch = runner.build_batch(chunks)
    assert batch.decode_rows == 2 and not batch.decode_only
    split = runner.forward(batch, graphs="none")
    batch.decode_rows = 0
    whole = runner.forward(batch, graphs="none")
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)
    assert runner.build_batch(chunks[:2]).decode_rows == 0  # decode-only: the decode path


def test_packed_uploads_start_every_array_16_byte_aligned() -> None:
    import numpy as np

    from greenroom.models.batch import upload_packed

    wide = [np.arange(n, dtype=np.int64) for n in (1, 3, 5)]
    narrow = [np.arange(n, dtype=np.int32) for n in (1, 2, 7, 6)]
    out_wide, out_narrow = upload_packed(wide, narrow, "cpu")
    for a, t in zip(wide + narrow, out_wide + out_narrow, strict=True):
        assert t.data_ptr() % 16 == 0
        assert t.tolist() == a.tolist()


def test_block_list_behaves_as_the_list_it_replaces() -> None:
    from greenroom.models.block_list import BlockList

    ids = BlockList([3, 4])
    ids.extend(range(5, 40))  # grows past its first buffer
    ids.extend([])
    assert len(ids) == 37 and ids[0] == 3 and ids[-1] == 39 and list(ids[1:3]) == [4, 5]
    assert ids.array().dtype.name == "int64" and ids == list(range(3, 40))
    del ids[10:]
    assert ids == list(range(3, 13))
    ids.extend([99])
    assert ids[-1] == 99 and len(ids) == 11
    with pytest.raises(TypeError):
        del ids[2]
