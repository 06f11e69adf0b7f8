"""Triton rotary embedding fused with the KV-cache write: one pass per token rotates q into a
new tensor and stores rotated k and v straight into their pool slots (the rotated k is never
materialized), one launch instead of two per layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from greenroom.kernels.triton_rotary import _cos_sin, _rotate_heads


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    pos_ptr,
    slot_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_kc_block,
    stride_kc_tok,
    stride_kc_head,
    stride_vc_block,
    stride_vc_tok,
    stride_vc_head,
    stride_cache,
    block_size,
    num_q_heads,
    num_kv_heads,
    half,
    head_dim,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, t, stride_cache, half, BLOCK_HALF)
    _rotate_heads(
        q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh,
        t, cos, sin, num_q_heads, half, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots (padding rows) write nothing
        block = slot // block_size
        offset = slot % block_size
        # the k row lands in the pool at its slot: a "token" of stride 0 there
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_tok
        _rotate_heads(
            k_ptr, k_dst, stride_kt, stride_kh, 0, stride_kc_head,
            t, cos, sin, num_kv_heads, half, BLOCK_HK, BLOCK_HALF,
        )  # fmt: skip
        h = tl.arange(0, BLOCK_HK)[:, None]
        dd = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (dd < head_dim)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dd, mask=mask)
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_tok
        tl.store(v_dst + h * stride_vc_head + dd, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
    """Rotate q [T, Hq, D] and k [T, Hkv, D] at ``positions``, store rotated k and v at
    ``slot_mapping`` (negative slots skipped); returns the rotated q (a new tensor)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert cos_sin_cache.shape[-1] == head_dim, "partial rotary is not fused"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    _rotary_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        q_out,
        k_cache,
        v_cache,
        positions,
        slot_mapping,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        cos_sin_cache.stride(0),
        k_cache.shape[1],
        num_q_heads,
        num_kv_heads,
        half,
        head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return q_out
