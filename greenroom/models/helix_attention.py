"""Helix decode attention across a context-parallel (CP) group.

Every CP rank holds a shard of each request's KV (see :mod:`greenroom.kv.helix_placement`).
Per layer, each rank attends its query heads over its own shard, giving a partial output
``O_i`` and log-sum-exp ``L_i`` for every head. One all-to-all over heads then hands rank ``r``
the partials of head slice ``r`` from every rank, and the exact combine
``O = sum_i exp(L_i - L) O_i``, ``L = log sum_i exp(L_i)`` gives the attention of that head
slice over the whole sequence. A rank whose shard is empty for a request contributes
``L_i = -inf`` and nothing else. The head slice is what a tensor-parallel ``o_proj`` (split by
heads, row-parallel) takes as input, so the rest of the layer runs TP over the same group.

The bytes exchanged per step are ``batch * heads * (head_dim + 1)`` values per rank, whatever
the context length.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from greenroom.kernels import ops
from greenroom.models.helix_batch import HelixRank, HelixView


def exchange_bytes(batch: int, num_heads: int, head_dim: int, cp_size: int) -> int:
    """Bytes one rank sends per layer and step (fp32 partials), excluding its own slice."""
    return batch * num_heads * (head_dim + 1) * 4 * (cp_size - 1) // cp_size


def exchange_and_merge(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-to-all partials ``out [B, Hq, D]`` / ``lse [B, Hq]`` over heads, then merge.

    Returns this rank's head slice ``[B, Hq / cp, D]`` (float32) and its merged lse.
    """
    cp = dist.get_world_size(group) if group is not None else 1
    b, hq, d = out.shape
    if hq % cp:
        raise ValueError(f"{hq} query heads cannot be split over cp_size = {cp}")
    h = hq // cp
    # out and lse travel in one message: [cp, B, h, D + 1], slice r goes to rank r
    packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)
    packed = packed.view(b, cp, h, d + 1).transpose(0, 1).contiguous()
    if cp > 1:
        received = torch.empty_like(packed)
        dist.all_to_all_single(received, packed, group=group)
    else:
        received = packed
    return ops.merge_attn_states(received[..., :d].contiguous(), received[..., d].contiguous())


def helix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    shard_lens: torch.Tensor,
    scale: float,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Decode attention of ``q [B, Hq, D]`` over this rank's shard, combined across the group.

    ``block_tables`` / ``shard_lens`` are this rank's blocks of each request (filled from the
    start, see :mod:`greenroom.kv.helix_placement`) and its token count there (``0`` where the
    rank holds nothing). Returns this rank's head slice ``[B, Hq / cp, D]`` in ``q``'s dtype."""
    out, lse = ops.paged_decode_attention_partial(
        q, k_cache, v_cache, block_tables, shard_lens, scale
    )
    merged, _ = exchange_and_merge(out, lse, group)
    return merged.to(q.dtype)


def partial_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    view: HelixView,
    positions: torch.Tensor,
    q_lens: np.ndarray,
    helix: HelixRank,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [T, Hq, D]`` over this rank's shard only, causal by GLOBAL position:
    (out ``[T, Hq, D]`` float32, lse ``[T, Hq]``; ``-inf`` where the shard has no key a query
    may see). A torch reference on every device: no kernel here returns the lse of a prefill
    (the decode kernel does), so Helix prefill runs this on CUDA too."""
    t, hq, d = q.shape
    tpb, cp, rank = helix.placement.tokens_per_block, helix.cp_size, helix.rank
    group = hq // k_cache.shape[2]
    out = torch.zeros((t, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    start = 0
    for row, n in enumerate(q_lens.tolist()):
        rows = slice(start, start + n)
        start += n
        held = int(view.host_shard_lens[row])
        if held == 0:
            continue
        nblk = -(-held // tpb)
        table = view.block_tables[row, :nblk].long()
        k = k_cache[table].reshape(nblk * tpb, *k_cache.shape[2:])[:held].float()
        v = v_cache[table].reshape(nblk * tpb, *v_cache.shape[2:])[:held].float()
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        slot = torch.arange(held, device=q.device)
        key_pos = (rank + (slot // tpb) * cp) * tpb + slot % tpb
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * scale
        visible = key_pos.unsqueeze(0) <= positions[rows].unsqueeze(1)  # [q, k]
        scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [h, q]
        finite = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        weights = torch.exp(scores - finite.unsqueeze(-1))
        out[rows] = torch.einsum("hqk,khd->qhd", weights, v)
        lse[rows] = row_lse.transpose(0, 1)
    return out, lse


def helix_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    view: HelixView,
    positions: torch.Tensor,
    q_lens: np.ndarray,
    helix: HelixRank,
    scale: float,
) -> torch.Tensor:
    """Prefill (or mixed) attention on a Helix rank: partial over the shard, then the
    exchange; returns this rank's head slice ``[T, Hq / cp, D]`` in ``q``'s dtype."""
    out, lse = partial_prefill_attention(q, k_cache, v_cache, view, positions, q_lens, helix, scale)
    merged, _ = exchange_and_merge(out, lse, helix.group)
    return merged.to(q.dtype)
