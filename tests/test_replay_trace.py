"""Trace requests: deterministic synthetic prompts, real prefix sharing for Mooncake hash ids,
private prompts for CSV rows, length caps and clipping to max_model_len, Poisson arrivals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.replay.readers import TraceRow
from greenroom.replay.tokens import BLOCK_TOKENS, block_tokens, request_tokens
from greenroom.replay.trace import build_requests, fit_lengths, load_trace, poisson_arrivals

VOCAB = 1000


def test_block_tokens_deterministic_and_in_vocab() -> None:
    a = block_tokens(42, VOCAB)
    assert a.shape == (BLOCK_TOKENS,)
    assert np.array_equal(a, block_tokens(42, VOCAB))
    assert not np.array_equal(a, block_tokens(43, VOCAB))
    assert not np.array_equal(a, block_tokens(42, VOCAB, seed=1))
    assert a.min() >= 0 and a.max() < VOCAB
    # spread over the vocabulary, not a handful of ids
    assert len(np.unique(a)) > 300
    tiny = block_tokens(7, 3)
    assert set(np.unique(tiny).tolist()) == {0, 1, 2}


def test_mooncake_shared_hash_ids_share_prompt_blocks() -> None:
    rows = [
        TraceRow(0.0, 1100, 4, [10, 11, 12]),  # last block partial: 76 tokens
        TraceRow(0.5, 1024, 4, [10, 11]),
        TraceRow(1.0, 600, 4, [10, 99]),
        TraceRow(2.0, 1500, 4, [20]),  # hash ids cover fewer tokens than input_length
    ]
    reqs = build_requests(rows, vocab_size=VOCAB)
    p = [r.prompt_token_ids for r in reqs]
    assert [len(x) for x in p] == [1100, 1024, 600, 1500]  # input_length is the truth
    assert np.array_equal(p[0][:1024], p[1])
    assert np.array_equal(p[0][:512], p[2][:512])
    assert not np.array_equal(p[0][512:600], p[2][512:600])
    assert np.array_equal(p[0][1024:], block_tokens(12, VOCAB)[:76])
    assert np.array_equal(p[3][:512], block_tokens(20, VOCAB))
    assert not np.array_equal(p[3][512:1024], p[0][512:1024])
    assert all(r.max_tokens == 4 and not r.clipped for r in reqs)


def test_csv_prompts_are_private_and_seeded() -> None:
    rows = [TraceRow(None, 600, 3), TraceRow(None, 600, 3)]
    a = build_requests(rows, vocab_size=VOCAB, seed=5)
    b = build_requests(rows, vocab_size=VOCAB, seed=5)
    c = build_requests(rows, vocab_size=VOCAB, seed=6)
    assert np.array_equal(a[0].prompt_token_ids, b[0].prompt_token_ids)
    assert not np.array_equal(a[0].prompt_token_ids[:16], a[1].prompt_token_ids[:16])
    assert not np.array_equal(a[0].prompt_token_ids, c[0].prompt_token_ids)
    assert np.array_equal(a[1].prompt_token_ids, request_tokens(1, 600, VOCAB, seed=5))
    assert [r.arrival_s for r in a] == [0.0, 0.0]  # no times and no rate: all at once


def test_clipping_and_caps() -> None:
    rows = [
        TraceRow(0.0, 3000, 100, [1, 2, 3, 4, 5, 6]),  # prompt cut to fit
        TraceRow(0.0, 10, 5000, []),  # output cut to fit
        TraceRow(0.0, 100, 50, []),  # fits
    ]
    reqs = build_requests(rows, vocab_size=VOCAB, max_model_len=2048)
    assert [(r.prompt_length, r.max_tokens, r.clipped) for r in reqs] == [
        (1948, 100, True),
        (1, 2047, True),
        (100, 50, False),
    ]
    assert np.array_equal(reqs[0].prompt_token_ids[:512], block_tokens(1, VOCAB))
    capped = build_requests(
        rows, vocab_size=VOCAB, max_model_len=2048, max_input_len=64, max_output_len=8
    )
    assert [(r.prompt_length, r.max_tokens, r.clipped, r.capped) for r in capped] == [
        (64, 8, False, True),
        (10, 8, False, True),
        (64, 8, False, True),
    ]
    assert capped[0].trace_input_length == 3000 and capped[0].trace_output_length == 100


@settings(max_examples=200, deadline=None)
@given(
    inp=st.integers(0, 10_000),
    out=st.integers(0, 10_000),
    model_len=st.integers(2, 8192),
    max_in=st.none() | st.integers(1, 4096),
    max_out=st.none() | st.integers(1, 4096),
)
def test_fit_lengths_properties(inp, out, model_len, max_in, max_out) -> None:
    prompt, tokens, clipped, capped = fit_lengths(
        inp, out, max_model_len=model_len, max_input_len=max_in, max_output_len=max_out
    )
    assert prompt >= 1 and tokens >= 1
    assert prompt + tokens <= model_len
    assert prompt <= max(1, inp) and tokens <= max(1, out)
    if max_in is not None:
        assert prompt <= max_in
    if max_out is not None:
        assert tokens <= max_out
    capped_in = min(max(1, inp), max_in or 10**9)
    capped_out = min(max(1, out), max_out or 10**9)
    assert capped == (capped_in < max(1, inp) or capped_out < max(1, out))
    assert clipped == (capped_in + capped_out > model_len)
    if not clipped:
        assert (prompt, tokens) == (capped_in, capped_out)
    elif capped_out < model_len:
        assert tokens == capped_out  # the output is kept whenever it fits by itself


def test_poisson_arrivals_seeded_with_the_right_rate() -> None:
    a = poisson_arrivals(4000, rate=20.0, seed=3)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, poisson_arrivals(4000, rate=20.0, seed=3))
    assert not np.array_equal(a, poisson_arrivals(4000, rate=20.0, seed=4))
    assert 3999 / a[-1] == pytest.approx(20.0, rel=0.06)
    with pytest.raises(ValueError):
        poisson_arrivals(3, rate=0.0, seed=0)


def test_rate_replaces_recorded_times_and_sorting(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 2000, "input_length": 10, "output_length": 2, "hash_ids": [0]},
        {"timestamp": 1000, "input_length": 20, "output_length": 2, "hash_ids": [1]},
        {"timestamp": 1000, "input_length": 30, "output_length": 2, "hash_ids": [2]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    reqs = load_trace(path, vocab_size=VOCAB)
    assert [(r.arrival_s, r.index) for r in reqs] == [(1.0, 1), (1.0, 2), (2.0, 0)]
    poisson = load_trace(path, vocab_size=VOCAB, rate=100.0, seed=1)
    assert [r.index for r in poisson] == [0, 1, 2]
    assert poisson[0].arrival_s == 0.0 and poisson[2].arrival_s < 1.0
    assert len(load_trace(path, "mooncake", vocab_size=VOCAB, max_requests=2)) == 2
