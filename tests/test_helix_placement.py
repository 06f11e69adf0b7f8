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
    assert p.blocks_per_rank(800) == [2, 2, 2, 2]
    assert p.tokens_per_rank(800) == [200, 200, 200, 200]
    # decode iteration t writes position 399 + t
    assert [p.active_rank(399 + t) for t in (1, 100, 101, 201, 301, 400)] == [0, 0, 1, 2, 3, 3]
    assert p.local_blocks(list(range(10, 18)), 1) == [11, 15]


def test_decode_fills_the_partial_prompt_block_first():
    p = HelixPlacement(cp_size=4, tokens_per_block=4)
    assert [p.active_rank(pos) for pos in (2, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]
    assert p.blocks_per_rank(9) == [1, 1, 1, 0]
    assert p.positions_on_rank(9, 2) == [8]
    assert p.shard_length(9, 0) == 4 and p.shard_length(9, 2) == 1 and p.shard_length(9, 3) == 0


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
    # what each rank holds, kept as the ranks would: the prompt at prefill, then one token per
    # decode step on the active rank only, which opens a block when its last one is full
    tokens = p.tokens_per_rank(prompt_len)
    blocks = p.blocks_per_rank(prompt_len)
    for t in range(num_output):
        position = prompt_len + t
        active = p.active_rank(position)
        if tokens[active] == blocks[active] * tokens_per_block:
            blocks[active] += 1
        tokens[active] += 1
        total = position + 1
        assert tokens == p.tokens_per_rank(total)
        assert blocks == p.blocks_per_rank(total)
        assert max(blocks) - min(blocks) <= 1
    total = prompt_len + num_output
    held = sorted(pos for r in range(cp_size) for pos in p.positions_on_rank(total, r))
    assert held == list(range(total))
    # each rank's shard is its blocks filled from the start: only its last block is partial
    for r in range(cp_size):
        assert len(p.positions_on_rank(total, r)) == p.shard_length(total, r)
