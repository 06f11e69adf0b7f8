"""Helix placement: balanced per-rank KV and exactly one appending rank per token."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.kv.helix_placement import HelixPlacement


def test_published_example_spreads_decode_blocks():
    """ISL 400, 100 tokens per block, cp 4: after 400 decode steps rank r holds prompt block r
    and decode block r (placing every decode token on the last rank gave it 500 tokens)."""
    p = HelixPlacement(cp_size=4, tokens_per_block=100)
    assert p.blocks_per_rank(400, 400) == [2, 2, 2, 2]
    assert p.tokens_per_rank(400, 400) == [200, 200, 200, 200]
    assert [p.active_rank(400, t) for t in (1, 100, 101, 201, 301, 400)] == [0, 0, 1, 2, 3, 3]


def test_decode_continues_round_robin_after_a_short_prompt():
    p = HelixPlacement(cp_size=4, tokens_per_block=4)
    # one prompt block on rank 0, so the first decode block goes to rank 1, not rank 0 again
    assert p.active_rank(3, 1) == 1
    assert p.blocks_per_rank(3, 5) == [1, 1, 1, 0]
    assert p.positions_on_rank(3, 5, 0) == [0, 1, 2]
    assert p.positions_on_rank(3, 5, 1) == [3, 4, 5, 6]
    assert p.positions_on_rank(3, 5, 2) == [7]


@pytest.mark.parametrize(
    "bad", [dict(cp_size=0, tokens_per_block=4), dict(cp_size=2, tokens_per_block=0)]
)
def test_rejects_bad_layouts(bad):
    with pytest.raises(ValueError, match="invalid"):
        HelixPlacement(**bad)


@settings(max_examples=150, deadline=None)
@given(
    prompt_len=st.integers(1, 300),
    num_output=st.integers(0, 200),
    tokens_per_block=st.sampled_from([1, 2, 4, 16, 32]),
    cp_size=st.integers(1, 5),
)
def test_every_step_balanced_and_one_rank_appends(
    prompt_len, num_output, tokens_per_block, cp_size
):
    p = HelixPlacement(cp_size=cp_size, tokens_per_block=tokens_per_block)
    # what each rank allocated, kept as a rank would: prompt blocks at prefill, then a new block
    # only on the active rank when a decode block opens
    blocks = p.blocks_per_rank(prompt_len, 0)
    tokens = p.tokens_per_rank(prompt_len, 0)
    for t in range(1, num_output + 1):
        active = p.active_rank(prompt_len, t)
        appending = [r for r in range(cp_size) if r == active]
        assert len(appending) == 1
        if p.opens_block(t):
            blocks[active] += 1
        tokens[active] += 1
        assert blocks == p.blocks_per_rank(prompt_len, t)
        assert tokens == p.tokens_per_rank(prompt_len, t)
        assert max(blocks) - min(blocks) <= 1
        assert sum(tokens) == prompt_len + t
        # every rank's blocks hold at most tokens_per_block tokens each
        assert all(tok <= blk * tokens_per_block for tok, blk in zip(tokens, blocks, strict=True))
    held = sorted(
        pos for r in range(cp_size) for pos in p.positions_on_rank(prompt_len, num_output, r)
    )
    assert held == list(range(prompt_len + num_output))
