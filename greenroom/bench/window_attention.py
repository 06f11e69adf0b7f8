"""Sliding-window attention cases of the kernel benchmark.

Decode: one query per request over a long context with a window; the kernel should read only
the window, so its bandwidth is counted over the window's K/V bytes and compared with the
device copy. The same time is also set against the bytes the whole context holds: a ratio
above 1 there means the kernel cannot have read the whole context (it would beat the copy).
Full attention over a context as long as the window is timed beside it: equal work, so the
two times should match.

Prefill: causal queries under a window, FLOPs counted over the keys each query sees, against
the dense causal SDPA problem of the same queries (flash on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

Bench = Callable[[Callable[[], object]], float]  # median seconds per call


@dataclass(frozen=True)
class AttentionShape:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page: int


def random_tables(
    num_blocks: int, batch: int, context: int, page: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables of random distinct blocks (1 up: 0 is the null block) and context lengths."""
    per_req = -(-context // page)
    blocks = torch.randperm(num_blocks - 1, device=device)[: batch * per_req] + 1
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return blocks.view(batch, per_req).to(torch.int32), lens


def kv_pool(
    tokens: int, shape: AttentionShape, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[blocks, 1, 2, page, Hkv, D]`` random K/V for ``tokens`` tokens plus the null block."""
    blocks = -(-tokens // shape.page) + 1
    size = (blocks, 1, 2, shape.page, shape.num_kv_heads, shape.head_dim)
    return torch.empty(size, dtype=dtype, device=device).normal_()


def windowed_decode_rows(
    decode: Callable,
    bench: Bench,
    copy_bw: float,
    shape: AttentionShape,
    cases: list[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[dict]:
    """One row per (batch, context, window): time, window bytes read per request token,
    bandwidth ratios over the window and over the whole context, and the time of full
    attention over a context as long as the window."""
    rows = []
    for batch, context, window in cases:
        pool = kv_pool(batch * context, shape, dtype, device)
        k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
        tables, lens = random_tables(pool.shape[0], batch, context, shape.page, device)
        q = torch.randn(batch, shape.num_q_heads, shape.head_dim, device=device, dtype=dtype)
        scale = shape.head_dim**-0.5
        token_bytes = 2 * shape.num_kv_heads * shape.head_dim * pool.element_size()
        q_bytes = 2 * q.numel() * q.element_size()  # q read, out written
        seen = min(context, window)
        window_io = batch * seen * token_bytes + q_bytes
        whole_io = batch * context * token_bytes + q_bytes
        seconds = bench(partial(decode, q, k_cache, v_cache, tables, lens, scale, window=window))
        same_work = bench(
            partial(decode, q, k_cache, v_cache, tables[:, : -(-seen // shape.page)],
                    torch.full_like(lens, seen), scale)
        )  # fmt: skip
        rows.append(
            dict(
                batch=batch,
                context=context,
                window=window,
                us=seconds * 1e6,
                kv_bytes_per_token=seen * token_bytes,
                whole_context_kv_bytes_per_token=context * token_bytes,
                GBps=window_io / seconds / 1e9,
                ratio=window_io / seconds / copy_bw,
                ratio_if_whole_context_read=whole_io / seconds / copy_bw,
                full_attention_over_window_us=same_work * 1e6,
                time_vs_full_attention_over_window=seconds / same_work,
            )
        )
        del pool
    return rows


def windowed_prefill_rows(
    prefill: Callable,
    bench: Bench,
    shape: AttentionShape,
    cases: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[dict]:
    """One row per (batch, new tokens, cached prefix, window): TFLOP/s over the keys each query
    sees, and the ratio to dense causal SDPA's TFLOP/s on the same queries without a prefix."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, d = shape.num_q_heads, shape.head_dim
    rows = []
    for batch, new, prefix, window in cases:
        context = prefix + new
        pool = kv_pool(batch * context + shape.page * batch, shape, dtype, device)
        tables, lens = random_tables(pool.shape[0], batch, context, shape.page, device)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * new
        q = torch.randn(batch * new, hq, d, device=device, dtype=dtype)
        keys_seen = sum(min(prefix + i + 1, window) for i in range(new))
        flops = 4 * hq * d * batch * keys_seen
        run = partial(
            prefill, q, pool[:, 0, 0], pool[:, 0, 1], tables, cu, lens, d**-0.5, new, window=window
        )
        seconds = bench(run)
        dq = torch.randn(batch, hq, new, d, device=device, dtype=dtype)
        dense_flops = 4 * hq * d * batch * new * (new + 1) // 2
        backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            sdpa = bench(
                partial(
                    torch.nn.functional.scaled_dot_product_attention, dq, dq, dq, is_causal=True
                )
            )
        tflops, sdpa_tflops = flops / seconds / 1e12, dense_flops / sdpa / 1e12
        rows.append(
            dict(
                batch=batch,
                new=new,
                prefix=prefix,
                window=window,
                us=seconds * 1e6,
                keys_per_query=keys_seen / new,
                TFLOPs=tflops,
                sdpa_dense_TFLOPs=sdpa_tflops,
                ratio=tflops / sdpa_tflops,
            )
        )
        del pool
    return rows


__all__ = [
    "AttentionShape",
    "kv_pool",
    "random_tables",
    "windowed_decode_rows",
    "windowed_prefill_rows",
]
