"""Plain-torch references for every kernel; the CPU path and the oracle for Triton tests.

KV cache layout. The pool is block-major,
``kv_pool[num_blocks, num_layers, 2, tokens_per_block, num_kv_heads, head_dim]``, and a
layer's caches are the views ``k_cache = kv_pool[:, layer, 0]`` and
``v_cache = kv_pool[:, layer, 1]`` of shape ``[num_blocks, tokens_per_block, num_kv_heads,
head_dim]``: ``stride(0)`` is a whole block of all layers, the inner three dims are
contiguous. Token ``t`` of a sequence lives in block ``block_table[t // tokens_per_block]``
at offset ``t % tokens_per_block``; its slot is ``block * tokens_per_block + offset``.

Rotary cache: ``cos_sin_cache[max_position, head_dim]`` (float32), the first half cos, the
second half sin of the ``head_dim // 2`` frequencies (NeoX / HF ``rotate_half`` style).

All attention math runs in float32; outputs come back in the query dtype, except the
``_partial`` variant and ``merge_attn_states``' log-sum-exp, which stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k, v [T, Hkv, D]`` at ``slot_mapping [T]`` (block * tokens_per_block + offset)."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, offsets] = v.to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """``[B, max_blocks * tokens_per_block, Hkv, D]`` of every block in each table row."""
    b, max_blocks = block_tables.shape
    gathered = cache[block_tables.long()]  # [B, maxb, bs, Hkv, D]
    return gathered.reshape(b, max_blocks * cache.shape[1], cache.shape[2], cache.shape[3])


def _visible_from(context_lens: torch.Tensor, window: int) -> torch.Tensor:
    """``[B]`` the first position the last query of each sequence sees (0 without a window)."""
    if window <= 0:
        return torch.zeros_like(context_lens)
    return (context_lens - window).clamp(min=0)


def _decode_partial(q, k_cache, v_cache, block_tables, lens, lo, scale):
    """Attention of one query per sequence over table positions ``[lo[b], lens[b])``."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    keys = _gather_context(k_cache, block_tables).float()
    values = _gather_context(v_cache, block_tables).float()
    qg = q.float().view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, keys) * scale
    t = torch.arange(keys.shape[1], device=q.device)
    valid = (t < lens.view(b, 1, 1, 1)) & (t >= lo.view(b, 1, 1, 1))
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhgt,bthd->bhgd", probs, values)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def paged_decode_attention_partial(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence over its first ``context_lens[b]`` cached tokens; with
    ``window > 0`` only over the last ``window`` of them (sliding-window attention: the query
    at position ``p`` sees keys ``p - window < t <= p``, as Hugging Face's mask).

    Returns the normalised output ``[B, Hq, D]`` and the log-sum-exp ``[B, Hq]`` (both
    float32). A sequence with no context gets ``out = 0, lse = -inf``. ``num_splits`` is
    accepted for signature parity; the result does not depend on it.
    """
    lo = _visible_from(context_lens, window)
    return _decode_partial(q, k_cache, v_cache, block_tables, context_lens, lo, scale)


def merge_attn_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combine of N partial attentions: ``O = sum_i exp(L_i - L) O_i``,
    ``L = log sum_i exp(L_i)``; outs ``[N, ..., Hq, D]``, lses ``[N, ..., Hq]``.
    Empty partials (``L_i = -inf``) contribute nothing; all-empty gives ``O = 0, L = -inf``."""
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - torch.where(torch.isinf(lse), 0.0, lse))
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Decode attention ``q [B, Hq, D]`` -> ``[B, Hq, D]`` (GQA: Hq a multiple of Hkv), over
    the last ``window`` tokens when ``window > 0``.

    With ``num_splits > 1`` the block table is cut into that many contiguous ranges, each
    attended separately and merged with :func:`merge_attn_states` (split-K).
    """
    splits = max(1, min(num_splits or 1, block_tables.shape[1]))
    if splits == 1:
        out, _ = paged_decode_attention_partial(
            q, k_cache, v_cache, block_tables, context_lens, scale, window=window
        )
        return out.to(q.dtype)
    block_size = k_cache.shape[1]
    first = _visible_from(context_lens, window)
    per_split = -(-block_tables.shape[1] // splits)
    outs, lses = [], []
    for start in range(0, block_tables.shape[1], per_split):
        table = block_tables[:, start : start + per_split]
        offset = start * block_size
        lens = (context_lens - offset).clamp(0, table.shape[1] * block_size)
        lo = (first - offset).clamp(min=0)
        out, lse = _decode_partial(q, k_cache, v_cache, table, lens, lo, scale)
        outs.append(out)
        lses.append(lse)
    out, _ = merge_attn_states(torch.stack(outs), torch.stack(lses))
    return out.to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    tiles: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Varlen causal attention over a cached prefix: sequence ``b`` has query tokens
    ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``, the last ones of its ``context_lens[b]``
    tokens (cached + new, all already written to the cache); with ``window > 0`` the query at
    position ``p`` sees only keys ``p - window < t <= p``. ``tiles`` only shapes a GPU launch;
    here every request's rows are computed whatever it says."""
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b, ctx in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        n_q = q_end - q_start
        if n_q == 0:
            continue
        blocks = block_tables[b, : -(-ctx // block_size)].long()
        keys = k_cache[blocks].reshape(-1, hkv, k_cache.shape[3])[:ctx]
        values = v_cache[blocks].reshape(-1, hkv, v_cache.shape[3])[:ctx]
        query_pos = torch.arange(ctx - n_q, ctx, device=q.device)
        key_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
        mask = key_pos <= query_pos.unsqueeze(1)
        if window > 0:
            mask &= key_pos > query_pos.unsqueeze(1) - window
        attn = F.scaled_dot_product_attention(
            q[q_start:q_end].float().transpose(0, 1),
            keys.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0),
            values.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0),
            attn_mask=mask,
            scale=scale,
        )
        out[q_start:q_end] = attn.transpose(0, 1).to(q.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, normalised in float32 and cast back before the weight (as HF)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (``x`` when residual is None); returns
    ``(rms_norm(new_residual), new_residual)``."""
    new_residual = x if residual is None else x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of the fused gate/up projection ``x [..., 2 * I]``: ``silu(gate) * up``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding of ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` at ``positions [T]``."""
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """``apply_rotary`` then ``write_kv_cache`` of the rotated k and of v at ``slot_mapping``;
    returns the rotated q."""
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


__all__ = [
    "apply_rotary",
    "fused_add_rms_norm",
    "merge_attn_states",
    "paged_decode_attention",
    "paged_decode_attention_partial",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_write_kv",
    "silu_and_mul",
    "write_kv_cache",
]
