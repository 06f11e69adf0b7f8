"""A Helix CP rank's view of a batch (local tables, shard lengths, KV slots) and the partial
prefill attention: every rank's partial over its shard, merged, equals one causal attention
over the whole sequence (in one process, no exchange)."""

from __future__ import annotations

import pytest
import torch

from greenroom.kernels import ops
from greenroom.kv.helix_placement import HelixPlacement
from greenroom.models.batch import ForwardBatch, SequenceChunk
from greenroom.models.helix_attention import partial_prefill_attention
from greenroom.models.helix_batch import HelixRank, HelixView

TPB, BPR, HQ, HKV, D = 4, 16, 4, 2, 8


def global_tables(lengths: list[int], cp: int) -> list[list[int]]:
    """Block j of request i on rank j mod cp, distinct local ids per rank."""
    used = [0] * cp
    tables = []
    for n in lengths:
        table = []
        for j in range(-(-n // TPB)):
            r = j % cp
            used[r] += 1
            table.append(r * BPR + used[r])
        tables.append(table)
    return tables


def test_view_keeps_this_ranks_blocks_and_skips_the_others_tokens() -> None:
    placement = HelixPlacement(cp_size=3, tokens_per_block=TPB)
    table = [1, 17, 33, 2, 18]  # blocks 0..4 on ranks 0, 1, 2, 0, 1
    chunk = SequenceChunk(list(range(7)), num_cached=11, block_ids=table)  # positions 11..17
    view = HelixView.build([chunk], HelixRank(placement, 1, BPR), torch.device("cpu"))
    assert view.block_tables.tolist() == [[1, 2]]  # global 17 and 18: rank 1, local 1 and 2
    assert view.shard_lens.tolist() == [placement.shard_length(18, 1)] == [6]
    # positions 11 (block 2, rank 2): skipped; 12..15 (block 3, rank 0): skipped;
    # 16, 17 (block 4, rank 1, its second local block): local slots 2 * 4 + 0, + 1
    assert view.slot_mapping.tolist() == [0, 0, 0, 0, 0, 8, 9]
    with pytest.raises(ValueError, match="not a block of CP rank 1"):
        HelixView.build(
            [SequenceChunk([1] * 5, 0, [1, 33])], HelixRank(placement, 1, BPR), torch.device("cpu")
        )


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_partials_over_every_rank_merge_to_causal_attention(cp) -> None:
    g = torch.Generator().manual_seed(cp)
    # (cached, new): a fresh prompt, a chunk continuing a cached prefix, a one-token decode
    # whose shard is empty on some ranks
    shapes = [(0, 9), (6, 7), (2, 1)]
    lengths = [c + n for c, n in shapes]
    tables = global_tables(lengths, cp)
    placement = HelixPlacement(cp_size=cp, tokens_per_block=TPB)
    keys = [torch.randn(n, HKV, D, generator=g) for n in lengths]
    values = [torch.randn(n, HKV, D, generator=g) for n in lengths]
    chunks = [SequenceChunk(list(range(n)), c, t) for (c, n), t in zip(shapes, tables, strict=True)]
    batch = ForwardBatch.build(chunks, TPB)
    q = torch.randn(batch.num_tokens, HQ, D, generator=g)
    outs, lses = [], []
    for rank in range(cp):
        helix = HelixRank(placement, rank, BPR)
        view = HelixView.build(chunks, helix, torch.device("cpu"))
        k_cache = torch.zeros(BPR, TPB, HKV, D)
        v_cache = torch.zeros_like(k_cache)
        for i, table in enumerate(tables):  # the KV of this rank's blocks, by global position
            for pos in range(lengths[i]):
                block = table[pos // TPB]
                if block // BPR == rank:
                    k_cache[block % BPR, pos % TPB] = keys[i][pos]
                    v_cache[block % BPR, pos % TPB] = values[i][pos]
        out, lse = partial_prefill_attention(
            q, k_cache, v_cache, view, batch.positions, batch.host_lens[0], helix, D**-0.5
        )
        outs.append(out)
        lses.append(lse)
    merged, _ = ops.merge_attn_states(torch.stack(outs), torch.stack(lses))
    start = 0
    for (cached, n), k, v in zip(shapes, keys, values, strict=True):
        qs = q[start : start + n]
        kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, kk) * D**-0.5
        pos = torch.arange(cached, cached + n)
        scores = scores.masked_fill(torch.arange(cached + n) > pos[:, None], float("-inf"))
        want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
        torch.testing.assert_close(merged[start : start + n], want, atol=1e-5, rtol=1e-5)
        start += n


def test_each_rank_runs_the_host_copies_of_its_own_blocks() -> None:
    from greenroom.bus.messages import BlockCopy

    # 3 ranks of 16 GPU blocks and 8 host blocks: host id = rank * 8 + local id
    copies = [
        BlockCopy("offload", 17, 13),  # rank 1: GPU local 1 -> host local 5
        BlockCopy("onboard", 21, 34),  # rank 2: host local 5 -> GPU local 2
        BlockCopy("onboard", 15, 19),  # rank 1: host local 7 -> GPU local 3
        BlockCopy("offload", 3, 0),  # rank 0
    ]
    placement = HelixPlacement(cp_size=3, tokens_per_block=TPB)
    own = [HelixRank(placement, r, BPR, None, 8).own_copies(copies) for r in range(3)]
    assert own[0] == [BlockCopy("offload", 3, 0)]
    assert own[1] == [BlockCopy("offload", 1, 5), BlockCopy("onboard", 7, 3)]
    assert own[2] == [BlockCopy("onboard", 5, 2)]
