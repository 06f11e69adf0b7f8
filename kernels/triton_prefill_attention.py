"""Triton paged prefill attention: varlen causal queries over a cached prefix in the paged pool.

The new tokens' K/V are already in the cache, so every key comes from the pool. Query i of
request b sits at position context_lens[b] - q_len_b + i and attends to positions <= it.
Each program handles BLOCK_M queries of one head: first the key chunks wholly before its first
query (no mask), then the diagonal chunks (causal mask). With a sliding window (query at p
sees keys p - window < t <= p) the program starts at the chunk holding its first query's
oldest visible key: chunks on the window's lower edge are masked too, chunks wholly inside
every query's window are not, and keys older than the window are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from greenroom.kernels.prefill_tiles import TILE_BLOCK_M
from greenroom.kernels.triton_decode_attention import NO_WINDOW

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_chunk(
    q, acc, m_i, l_i, start, k_base, v_base, table, pos, ctx, window, d, dmask,
    stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr,
):  # fmt: skip
    t = start + tl.arange(0, BLOCK_N)
    if MASKED:
        tmask = t < ctx
        blk = tl.load(table + t // PAGE, mask=tmask, other=0).to(tl.int64)
        kv_mask = tmask[:, None] & dmask[None, :]
    else:
        blk = tl.load(table + t // PAGE).to(tl.int64)
        kv_mask = dmask[None, :]
    off = t % PAGE
    k_ptrs = k_base + blk[:, None] * stride_kb + off[:, None] * stride_kt + d[None, :]
    v_ptrs = v_base + blk[:, None] * stride_vb + off[:, None] * stride_vt + d[None, :]
    if EVEN_D and not MASKED:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (t[None, :] <= pos[:, None]) & tmask[None, :]
        if SLIDING:
            visible &= t[None, :] > pos[:, None] - window
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if SLIDING and MASKED:  # a window-edge chunk may show a row nothing yet: keep it finite
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(qk - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if EVEN_D and not MASKED:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Arguments that follow the batch (split count, block-table width, tile counts) are not
# specialized on their values: each new value class would compile another variant mid-serving.
@triton.jit(do_not_specialize=["num_m_blocks", "num_tiles", "stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    context_lens_ptr,
    tiles_ptr,
    out_ptr,
    scale_log2,
    window,
    head_dim,
    num_m_blocks,
    num_tiles,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILED: tl.constexpr,
    SLIDING: tl.constexpr,
):
    h = tl.program_id(1)
    if TILED:  # (request, query block) from the host's tile list (see prefill_tiles.py)
        b = tl.load(tiles_ptr + tl.program_id(0)).to(tl.int64)
        mb = tl.load(tiles_ptr + num_tiles + tl.program_id(0))
    else:  # the longest-running (last) query blocks are scheduled first
        mb = num_m_blocks - 1 - tl.program_id(0)
        b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + b)
    prefix = ctx - q_len
    kvh = h // GROUP

    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    pos = prefix + m
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    table = block_tables_ptr + b * stride_bt

    first_pos = prefix + mb * BLOCK_M
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    end = tl.minimum(first_pos + BLOCK_M, ctx)
    if SLIDING:  # [lo, full_lo): the window's lower edge, seen by some queries only
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(end - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), full_end)
        for start in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i = _attend_chunk(
                q, acc, m_i, l_i, start, k_base, v_base, table, pos, ctx, window, d, dmask,
                stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
                PAGE, BLOCK_N, True, EVEN_D, DOT_PRECISION, SLIDING,
            )  # fmt: skip
    else:
        full_lo = 0
    for start in range(full_lo, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_chunk(
            q, acc, m_i, l_i, start, k_base, v_base, table, pos, ctx, window, d, dmask,
            stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
            PAGE, BLOCK_N, False, EVEN_D, DOT_PRECISION, SLIDING,
        )  # fmt: skip
    for start in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_chunk(
            q, acc, m_i, l_i, start, k_base, v_base, table, pos, ctx, window, d, dmask,
            stride_kb, stride_kt, stride_vb, stride_vt, scale_log2,
            PAGE, BLOCK_N, True, EVEN_D, DOT_PRECISION, SLIDING,
        )  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tiles: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of varlen new tokens q [T, Hq, D] over cached + new K/V -> [T, Hq, D];
    ``window > 0``: sliding-window attention (the query at p sees keys p - window < t <= p).

    ``tiles`` (int32 ``[2, n]`` from :func:`prefill_tiles`, built for ``block_m``, default
    ``TILE_BLOCK_M``) fixes the launch at ``n`` programs per head whatever the batch (CUDA
    graphs); rows no tile covers (padding) are left as they are in ``out``.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    batch = context_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    fp32 = q.dtype == torch.float32
    on_gpu = q.device.type == "cuda"
    if on_gpu and not fp32 and max_seqlen_q >= 4096:
        default = (128, 128, 8, 3)  # measured best on an H200 for long prompts
    elif on_gpu:
        default = (64, 64, 4, 3)
    else:
        default = (16, 16, 4, 1)
    if tiles is not None:
        block_m = block_m or TILE_BLOCK_M
    block_m = block_m or default[0]
    block_n = block_n or default[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_m_blocks = triton.cdiv(max_seqlen_q, block_m)
    if tiles is None:
        grid, num_tiles = (num_m_blocks, num_q_heads, batch), 0
    else:
        assert tiles.dtype == torch.int32 and tiles.shape[0] == 2 and tiles.is_contiguous()
        num_tiles = tiles.shape[1]
        grid = (num_tiles, num_q_heads, 1)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        cu_seqlens_q if tiles is None else tiles,
        out,
        scale * _LOG2E,
        window if window > 0 else NO_WINDOW,
        head_dim,
        num_m_blocks,
        num_tiles,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        TILED=tiles is not None,
        SLIDING=window > 0,
        num_warps=num_warps or default[2],
        num_stages=num_stages or default[3],
    )
    return out
