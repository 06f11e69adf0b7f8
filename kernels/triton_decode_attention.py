"""Triton paged decode attention: GQA, split-K over the context, exact LSE merge of splits.

One program handles one (request, kv head, split): the query heads of the kv head's group form
the rows of the score tile, so each K/V tile is read from HBM once per group. Splits write
(out, lse) partials that `merge_attn_states_into` combines. With a sliding window the splits
cut only the window's span, so blocks wholly before it are never read.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

from greenroom.kernels.triton_merge_attn_states import merge_attn_states_into

_LOG2E = 1.4426950408889634
# Below this many tokens per split the merge and launch overheads outweigh extra parallelism.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 32
# The window passed for full attention: longer than any context, so every position is seen.
NO_WINDOW = 1 << 30
# SMs the caller's kernels run on, when a partition (green context) gives it fewer than the
# device has; split-K and launch shapes are sized for that many.
_SM_BUDGET: ContextVar[int | None] = ContextVar("decode_sm_budget", default=None)


@contextlib.contextmanager
def sm_budget(num_sms: int | None) -> Iterator[None]:
    """Size decode launches in this context for ``num_sms`` SMs (None: the whole device)."""
    token = _SM_BUDGET.set(num_sms)
    try:
        yield
    finally:
        _SM_BUDGET.reset(token)


# Arguments that follow the batch (split count, block-table width, tile counts) are not
# specialized on their values: each new value class would compile another variant mid-serving.
@triton.jit(do_not_specialize=["num_splits", "stride_bt", "stride_os", "stride_ls"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    lse_ptr,
    scale_log2,
    num_splits,
    window,
    head_dim,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_os,
    stride_ob,
    stride_oh,
    stride_ls,
    stride_lb,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    if HEADS_FIRST:  # a request's kv heads are launched next to each other
        kvh = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
    else:
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    first = tl.maximum(ctx - window, 0)  # the first position the query sees
    split_len = tl.cdiv(tl.cdiv(ctx - first, num_splits), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    hi = tl.minimum(lo + split_len, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    table = block_tables_ptr + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        blk = tl.load(table + t // PAGE, mask=tmask, other=0).to(tl.int64)
        off = t % PAGE
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(
            k_base + blk[:, None] * stride_kb + off[:, None] * stride_kt + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        qk = tl.where(tmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + blk[:, None] * stride_vb + off[:, None] * stride_vt + d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = l_i > 0.0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
    o_ptrs = out_ptr + split * stride_os + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    if WRITE_LSE:
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))  # fmt: skip
        tl.store(lse_ptr + split * stride_ls + b * stride_lb + heads, lse, mask=gmask)


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context: int,
    device: torch.device,
    sm_count: int | None = None,
) -> int:
    """Splits per (request, kv head) for about two programs per SM; depends only on shapes.

    ``sm_count`` None: the ``sm_budget`` in effect, else the device's SM count."""
    if device.type != "cuda":
        return 1
    programs = max(batch * num_kv_heads, 1)
    wanted = round(2 * (sm_count or _available_sms(device)) / programs)
    by_length = max(max_context // _MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _available_sms(device: torch.device) -> int:
    budget = _SM_BUDGET.get()
    return min(budget, _sm_count(device)) if budget else _sm_count(device)


def _default_launch(batch: int, num_kv_heads: int, device: torch.device) -> dict[str, int]:
    # Measured on an H200 (bench_kernels --tune): with fewer (request, kv head) programs than
    # SMs, longer tiles and more warps keep enough loads in flight per SM; with many, a
    # request's kv heads launched side by side read whole KV blocks together (0.957 -> 0.973
    # of the copy bandwidth at 414 requests x 1500 tokens, 0.969 -> 0.989 at 256 x 1500).
    if device.type == "cuda" and batch * num_kv_heads < _available_sms(device):
        return dict(block_n=128, num_warps=8, num_stages=3, heads_first=0)
    return dict(block_n=64, num_warps=4, num_stages=3, heads_first=1)


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    num_splits: int,
    window: int = 0,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_first: int | None = None,
) -> None:
    """``heads_first``: launch a request's kv heads next to each other (grid axis 0), so the
    programs running together read whole KV blocks rather than one head's slices of many."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    fp32 = q.dtype == torch.float32
    default = _default_launch(batch, num_kv_heads, q.device)
    if fp32:  # fp32 tiles are twice the bytes: halve them
        default["block_n"] //= 2
    first = default["heads_first"] if heads_first is None else heads_first
    grid = (num_kv_heads, batch, num_splits) if first else (batch, num_kv_heads, num_splits)
    _decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        lse if lse is not None else out,
        scale * _LOG2E,
        num_splits,
        window if window > 0 else NO_WINDOW,
        head_dim,
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
        out.stride(2),
        lse.stride(0) if lse is not None else 0,
        lse.stride(1) if lse is not None else 0,
        GROUP=group,
        PAGE=page,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n or default["block_n"],
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        WRITE_LSE=lse is not None,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        HEADS_FIRST=bool(first),
        num_warps=num_warps or default["num_warps"],
        num_stages=num_stages or (default["num_stages"] if q.is_cuda else 1),
    )


def _splits(
    q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, window: int = 0
) -> int:
    max_context = block_tables.shape[1] * k_cache.shape[1]
    if window > 0:  # a program reads at most the window
        max_context = min(max_context, window)
    return choose_num_splits(q.shape[0], k_cache.shape[2], max_context, q.device)


def paged_decode_attention_partial(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    **launch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token per request -> (out [B, Hq, D] fp32, lse [B, Hq] fp32, natural log),
    over the last ``window`` tokens when ``window > 0``.

    An empty context gives out = 0, lse = -inf.
    """
    splits = num_splits or _splits(q, k_cache, block_tables, window)
    batch, num_q_heads, head_dim = q.shape
    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    if splits == 1:
        _launch(q, k_cache, v_cache, block_tables, context_lens, scale, out.unsqueeze(0),
                lse.unsqueeze(0), 1, window, **launch)  # fmt: skip
        return out, lse
    parts = torch.empty(splits, batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(splits, batch, num_q_heads, dtype=torch.float32, device=q.device)
    _launch(
        q, k_cache, v_cache, block_tables, context_lens, scale, parts, part_lse, splits, window,
        **launch,
    )  # fmt: skip
    merge_attn_states_into(
        parts.view(splits, -1, head_dim),
        part_lse.view(splits, -1),
        out.view(-1, head_dim),
        lse.view(-1),
    )
    return out, lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
    *,
    out: torch.Tensor | None = None,
    **launch: int,
) -> torch.Tensor:
    """One decode token per request: q [B, Hq, D] over paged K/V -> out [B, Hq, D] in q.dtype;
    ``window > 0``: sliding-window attention over the last ``window`` tokens."""
    splits = num_splits or _splits(q, k_cache, block_tables, window)
    batch, num_q_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    if splits == 1:
        _launch(
            q,
            k_cache,
            v_cache,
            block_tables,
            context_lens,
            scale,
            out.unsqueeze(0),
            None,
            1,
            window,
            **launch,
        )
        return out
    parts = torch.empty(splits, batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(splits, batch, num_q_heads, dtype=torch.float32, device=q.device)
    _launch(
        q, k_cache, v_cache, block_tables, context_lens, scale, parts, part_lse, splits, window,
        **launch,
    )  # fmt: skip
    merge_attn_states_into(
        parts.view(splits, -1, head_dim), part_lse.view(splits, -1), out.view(-1, head_dim), None
    )
    return out
