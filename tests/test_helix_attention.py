"""Helix decode attention: shards on several gloo ranks combine to one attention over the whole
sequence, including ranks with an empty shard and shards of very different sizes."""

from __future__ import annotations

import socket

import helix_ranks
import pytest
import torch
import torch.multiprocessing as mp

from greenroom.kernels import reference
from greenroom.kv.helix_placement import HelixPlacement
from greenroom.models.helix_attention import exchange_and_merge, helix_decode_attention

# (prompt tokens, decoded tokens): a one-block prompt (two of three ranks hold nothing of it),
# partial prompt blocks followed by decode blocks, and shards of very different sizes
CASES = [(3, 0), (37, 11), (200, 45), (5, 40), (1, 1)]
TPB = 4


def _whole_sequence_attention(q, kv):
    outs = []
    for b, (k, v) in enumerate(kv):
        table = torch.arange(len(k)).view(1, -1)
        out, _ = reference.paged_decode_attention_partial(
            q[b : b + 1],
            k.unsqueeze(1),
            v.unsqueeze(1),
            table,
            torch.tensor([len(k)]),
            helix_ranks.HEAD_DIM**-0.5,
        )
        outs.append(out)
    return torch.cat(outs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cp_size", [1, 3])
def test_shards_combine_to_whole_sequence_attention(cp_size, tmp_path):
    q, kv = helix_ranks.sequences(CASES)
    expected = _whole_sequence_attention(q, kv)
    if cp_size == 1:
        inputs = helix_ranks.shard_inputs(CASES, kv, HelixPlacement(1, TPB), 0)
        out = helix_decode_attention(q, *inputs, scale=helix_ranks.HEAD_DIM**-0.5, group=None)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        return
    mp.spawn(
        helix_ranks.decode_rank,
        args=(cp_size, _free_port(), TPB, CASES, str(tmp_path)),
        nprocs=cp_size,
        join=True,
    )
    heads = helix_ranks.HEADS // cp_size
    for rank in range(cp_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = expected[:, rank * heads : (rank + 1) * heads]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_shard_contributes_nothing():
    """A shard with no tokens (lse = -inf) merged with a real one gives the real one."""
    q, kv = helix_ranks.sequences([(9, 0)])
    k, v = kv[0]
    full, full_lse = reference.paged_decode_attention_partial(
        q, k.unsqueeze(1), v.unsqueeze(1), torch.arange(9).view(1, -1), torch.tensor([9]), 0.3
    )
    empty = torch.zeros_like(full), torch.full_like(full_lse, float("-inf"))
    out, lse = reference.merge_attn_states(
        torch.stack([empty[0], full]), torch.stack([empty[1], full_lse])
    )
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    merged, _ = exchange_and_merge(full, full_lse, group=None)
    torch.testing.assert_close(merged, full)
