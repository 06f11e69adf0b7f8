"""Batched sampling: greedy, temperature, top-k, top-p, seeds, log-probs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.bus.messages import SamplingParams
from greenroom.models.sampling import SamplingBatch, request_seed, sample, uniform_noise

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(n, V, generator=torch.Generator().manual_seed(seed))


def draw(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]):
    return sample(logits, SamplingBatch.build(params, seeds, steps, "cpu"))


def test_greedy_is_argmax() -> None:
    logits = logits_rows(4)
    out = draw(logits, [SamplingParams()] * 4, [1, 2, 3, 4], [0, 0, 5, 9])
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_logprobs is None


def test_seeded_token_depends_only_on_seed_step_and_logits() -> None:
    logits = logits_rows(3)
    hot = SamplingParams(temperature=1.0, seed=11)
    alone = draw(logits[1:2], [hot], [11], [4]).token_ids.item()
    # same row, other batch neighbours, another row order, greedy neighbours
    mixed = draw(
        torch.stack([logits[0], logits[2], logits[1]]),
        [SamplingParams(), SamplingParams(temperature=0.7, top_k=3), hot],
        [99, 5, 11],
        [0, 1, 4],
    )
    assert mixed.token_ids[2].item() == alone
    steps = [draw(logits[1:2], [hot], [11], [s]).token_ids.item() for s in range(40)]
    assert len(set(steps)) > 3  # the output index changes the draw


def test_uniform_noise_is_uniform_and_distinct_per_seed() -> None:
    u = uniform_noise(torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1]), 4096)
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    big = uniform_noise(torch.tensor([-5, 2**62 + 3]), torch.tensor([2**40, 7]), 16)
    assert ((big > 0) & (big < 1)).all()


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    n = 4000
    params = [SamplingParams(temperature=0.8)] * n
    tokens = draw(logits.expand(n, V), params, list(range(n)), [0] * n).token_ids
    freq = torch.bincount(tokens, minlength=V)[:4].float() / n
    expect = (logits[0, :4] / 0.8).softmax(-1)
    torch.testing.assert_close(freq, expect, atol=0.03, rtol=0)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**40), row=st.integers(0, 7))
def test_top_k_only_picks_the_k_best(k: int, seed: int, row: int) -> None:
    logits = logits_rows(8)[row : row + 1]
    token = draw(logits, [SamplingParams(temperature=5.0, top_k=k)], [seed], [0]).token_ids
    assert token.item() in logits[0].topk(k).indices.tolist()


@settings(max_examples=30, deadline=None)
@given(p=st.floats(0.05, 0.95), seed=st.integers(0, 2**40), row=st.integers(0, 7))
def test_top_p_picks_inside_the_nucleus(p: float, seed: int, row: int) -> None:
    logits = logits_rows(8, seed=1)[row : row + 1]
    token = draw(logits, [SamplingParams(temperature=3.0, top_p=p)], [seed], [0]).token_ids.item()
    probs, order = (logits[0] / 3.0).softmax(-1).sort(descending=True)  # temperature first
    before = probs.cumsum(0) - probs
    nucleus = order[before <= p].tolist()
    assert token in nucleus


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = logits_rows(6)
    params = [SamplingParams(temperature=10.0, top_k=1)] * 6
    assert torch.equal(draw(logits, params, list(range(6)), [0] * 6).token_ids, logits.argmax(-1))


def test_logprobs_of_sampled_and_top_tokens() -> None:
    logits = logits_rows(3)
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(temperature=1.0, logprobs=1),
        SamplingParams(),
    ]
    out = draw(logits, params, [1, 2, 3], [0, 0, 0])
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(out.token_logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    top, ids = ref.topk(3, -1)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, top)


def test_request_seed_is_stable_and_depends_on_engine_seed() -> None:
    assert request_seed("req-1", 0) == request_seed("req-1", 0)
    assert request_seed("req-1", 0) != request_seed("req-1", 1)
    assert 0 <= request_seed("req-2", 0) < 2**63
