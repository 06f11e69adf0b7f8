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

import torch
import torch.distributed as dist

from greenroom.kernels import ops


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
    prompt_tables: torch.Tensor,
    prompt_lens: torch.Tensor,
    decode_tables: torch.Tensor,
    decode_lens: torch.Tensor,
    scale: float,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Decode attention of ``q [B, Hq, D]`` over this rank's shard, combined across the group.

    A rank's shard of a request is two runs of blocks, each filled from its start: its prompt
    blocks (only the prompt's last block can be partial, and it comes last) and its decode
    blocks (only the newest can be partial). ``*_tables`` / ``*_lens`` give each run's block
    table and token count (``0`` where the rank holds none). Both runs are attended in one
    launch (as ``2B`` rows), merged locally, then exchanged. Returns this rank's head slice
    ``[B, Hq / cp, D]`` in ``q``'s dtype."""
    b = q.shape[0]
    width = max(prompt_tables.shape[1], decode_tables.shape[1])
    tables = torch.cat([_pad_columns(prompt_tables, width), _pad_columns(decode_tables, width)])
    out, lse = ops.paged_decode_attention_partial(
        torch.cat([q, q]), k_cache, v_cache, tables, torch.cat([prompt_lens, decode_lens]), scale
    )
    local_out, local_lse = ops.merge_attn_states(
        out.view(2, b, *out.shape[1:]), lse.view(2, b, *lse.shape[1:])
    )
    merged, _ = exchange_and_merge(local_out, local_lse, group)
    return merged.to(q.dtype)


def _pad_columns(table: torch.Tensor, width: int) -> torch.Tensor:
    if table.shape[1] == width:
        return table
    pad = table.new_zeros(table.shape[0], width - table.shape[1])
    return torch.cat([table, pad], dim=1)
