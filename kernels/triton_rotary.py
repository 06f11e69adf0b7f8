"""Triton rotary position embedding, NeoX style (rotate_half, as HF Llama)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src_t,
    stride_src_h,
    stride_dst_t,
    stride_dst_h,
    t,
    cos,
    sin,
    num_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < num_heads) & (d < half)
    src = src_ptr + t * stride_src_t + h * stride_src_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    dst = dst_ptr + t * stride_dst_t + h * stride_dst_h + d
    tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, o2.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(pos_ptr, cache_ptr, t, stride_cache, half, BLOCK_HALF: tl.constexpr):
    """Token ``t``'s cos and sin rows [1, BLOCK_HALF] (fp32) from the cache at its position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = d < half
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + d, mask=cmask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    num_q_heads,
    num_kv_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, t, stride_cache, half, BLOCK_HALF)
    _rotate_heads(
        q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh,
        t, cos, sin, num_q_heads, half, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh,
        t, cos, sin, num_kv_heads, half, BLOCK_HK, BLOCK_HALF,
    )  # fmt: skip


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (or [T, H*D]) at `positions`.

    cos_sin_cache is [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]). Results go to new tensors,
    or to q_out / k_out (contiguous; passing q and k themselves rotates in place).
    """
    rot_dim = cos_sin_cache.shape[-1]
    num_tokens = q.shape[0]
    q3 = q.reshape(num_tokens, -1, rot_dim)
    k3 = k.reshape(num_tokens, -1, rot_dim)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    q_out = torch.empty(q3.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k3.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    q_out, k_out = q_out.view(q3.shape), k_out.view(k3.shape)
    if num_tokens:
        half = rot_dim // 2
        _rotary_kernel[(num_tokens,)](
            q3,
            k3,
            q_out,
            k_out,
            positions,
            cos_sin_cache,
            q3.stride(0),
            q3.stride(1),
            k3.stride(0),
            k3.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos_sin_cache.stride(0),
            q3.shape[1],
            k3.shape[1],
            half,
            BLOCK_HQ=triton.next_power_of_2(q3.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k3.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half),
        )
    return q_out.view(q.shape), k_out.view(k.shape)
