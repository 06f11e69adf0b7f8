"""Triton kernels on a CUDA device, real shapes, bf16 and fp32, against the torch references.

Outputs are NaN-filled before each call so an unwritten element fails the test.
"""

from __future__ import annotations

import kernels_inputs as inputs
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
DTYPES = [torch.bfloat16, torch.float32]
HEAD_DIM = 128
PAGE = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN or unwritten output"
    err = inputs.rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def _nan_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full(t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 32), (32, 8), (64, 8)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_attention(dtype, num_q_heads, num_kv_heads, num_splits):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_decode_attention import (
        paged_decode_attention,
        paged_decode_attention_partial,
    )

    context_lens = [1, 0, 17, 4096, 1000, 2047, 3333, 64]
    kv = inputs.make_paged_kv(context_lens, PAGE, num_kv_heads, HEAD_DIM, dtype, "cuda")
    q = torch.randn(len(context_lens), num_q_heads, HEAD_DIM, device="cuda").to(dtype)
    args = (kv.block_tables, kv.context_lens, HEAD_DIM**-0.5)
    k_ref, v_ref = kv.clean()
    ref_out, ref_lse = reference.paged_decode_attention_partial(q, k_ref, v_ref, *args)

    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, *args, num_splits, out=_nan_like(q))
    _check(out, ref_out, dtype)
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, *args, num_splits, out=_nan_like(q), heads_first=1
    )
    _check(out, ref_out, dtype)
    part_out = _nan_like(q, torch.float32)
    part_lse = _nan_like(ref_lse)
    paged_decode_attention_partial(
        q, kv.k_cache, kv.v_cache, *args, num_splits, out=part_out, lse=part_lse
    )
    _check(part_out, ref_out, dtype)
    assert torch.isneginf(part_lse[1]).all() and (part_out[1] == 0).all()
    keep = kv.context_lens > 0
    torch.testing.assert_close(part_lse[keep], ref_lse[keep], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 32), (32, 8), (64, 8)])
def test_prefill_attention(dtype, num_q_heads, num_kv_heads):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_prefill_attention import paged_prefill_attention

    requests = [(1000, 300), (0, 515), (37, 1), (4093, 129)]  # (cached prefix, new tokens)
    context_lens = [p + n for p, n in requests]
    kv = inputs.make_paged_kv(context_lens, PAGE, num_kv_heads, HEAD_DIM, dtype, "cuda")
    q_lens = [n for _, n in requests]
    cu = torch.tensor(
        [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    q = torch.randn(int(cu[-1]), num_q_heads, HEAD_DIM, device="cuda").to(dtype)
    args = (kv.block_tables, cu, kv.context_lens, HEAD_DIM**-0.5, max(q_lens))
    out = paged_prefill_attention(q, kv.k_cache, kv.v_cache, *args, out=_nan_like(q))
    k_ref, v_ref = kv.clean()
    _check(
        out,
        reference.paged_prefill_attention(q.float(), k_ref.float(), v_ref.float(), *args),
        dtype,
    )


@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("window", [1, 1000, 4096])
def test_decode_attention_windowed(num_splits, window):
    """bf16 sliding-window decode; every slot older than the window is NaN (never read)."""
    from greenroom.kernels import reference
    from greenroom.kernels.triton_decode_attention import paged_decode_attention

    dtype = torch.bfloat16
    context_lens = [1, 0, 17, 4096, 1000, 2047, 3333, 64, 9000]
    kv = inputs.make_paged_kv(context_lens, PAGE, 8, HEAD_DIM, dtype, "cuda")
    q = torch.randn(len(context_lens), 32, HEAD_DIM, device="cuda").to(dtype)
    args = (kv.block_tables, kv.context_lens, HEAD_DIM**-0.5)
    k_ref, v_ref = kv.clean()
    ref_out, _ = reference.paged_decode_attention_partial(q, k_ref, v_ref, *args, window=window)
    inputs.poison_before(kv, [n - window for n in context_lens])
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, *args, num_splits, window, out=_nan_like(q)
    )
    _check(out[kv.context_lens > 0], ref_out[kv.context_lens > 0], dtype)


@pytest.mark.parametrize("window", [1, 300, 4096])
@pytest.mark.parametrize("tiled", [False, True])
def test_prefill_attention_windowed(window, tiled):
    """bf16 sliding-window prefill over cached prefixes, per-batch and tile-list launches; keys
    older than every query's window are NaN (never read)."""
    from greenroom.kernels import reference
    from greenroom.kernels.prefill_tiles import max_tiles, prefill_tiles
    from greenroom.kernels.triton_prefill_attention import paged_prefill_attention

    dtype = torch.bfloat16
    requests = [(1000, 300), (0, 515), (37, 1), (4093, 129), (9000, 64)]
    context_lens = [p + n for p, n in requests]
    kv = inputs.make_paged_kv(context_lens, PAGE, 8, HEAD_DIM, dtype, "cuda")
    q_lens = [n for _, n in requests]
    cu = torch.tensor(
        [0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    q = torch.randn(int(cu[-1]), 32, HEAD_DIM, device="cuda").to(dtype)
    args = (kv.block_tables, cu, kv.context_lens, HEAD_DIM**-0.5, max(q_lens))
    k_ref, v_ref = kv.clean()
    ref = reference.paged_prefill_attention(
        q.float(), k_ref.float(), v_ref.float(), *args, window=window
    )
    inputs.poison_before(kv, inputs.window_unread_before(requests, window, 128))
    tiles = None
    if tiled:
        n = max_tiles(int(cu[-1]), len(requests))
        tiles = torch.from_numpy(prefill_tiles(q_lens, context_lens, n, window=window)).cuda()
    out = paged_prefill_attention(
        q, kv.k_cache, kv.v_cache, *args, out=_nan_like(q), tiles=tiles, window=window
    )
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attn_states(dtype):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_merge_attn_states import merge_attn_states

    outs = torch.randn(4, 64, 32, HEAD_DIM, device="cuda").to(dtype)
    lses = torch.randn(4, 64, 32, device="cuda") * 5
    lses[1:, 3] = float("-inf")
    lses[:, 5, 7] = float("-inf")
    out, lse = merge_attn_states(outs, lses, out=_nan_like(outs[0]), lse=_nan_like(lses[0]))
    ref_out, ref_lse = reference.merge_attn_states(outs.float(), lses)
    _check(out, ref_out, dtype)
    assert torch.isneginf(lse[5, 7]) and (out[5, 7] == 0).all()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache(dtype):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_kv_cache import write_kv_cache

    kv = inputs.make_paged_kv([100, 2000], PAGE, 8, HEAD_DIM, dtype, "cuda", extra_blocks=200)
    num_tokens = 777
    slots = torch.randperm(200 * PAGE, device="cuda")[:num_tokens] + (kv.pool.shape[0] - 200) * PAGE
    slots[::10] = -1
    k = torch.randn(num_tokens, 8, HEAD_DIM, device="cuda").to(dtype)
    v = torch.randn(num_tokens, 8, HEAD_DIM, device="cuda").to(dtype)
    expected = kv.pool.clone()
    keep = slots >= 0
    reference.write_kv_cache(k[keep], v[keep], expected[:, 1, 0], expected[:, 1, 1], slots[keep])
    write_kv_cache(k, v, kv.k_cache, kv.v_cache, slots)
    assert torch.equal(kv.pool.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_rms_norm import fused_add_rms_norm, rms_norm

    x = torch.randn(257, 4096, device="cuda").to(dtype)
    residual = torch.randn_like(x)
    weight = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    _check(rms_norm(x, weight, 1e-5, out=_nan_like(x)), reference.rms_norm(x, weight, 1e-5), dtype)
    normed, new_residual = fused_add_rms_norm(
        x, residual, weight, 1e-5, out=_nan_like(x), residual_out=_nan_like(x)
    )
    ref_normed, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    _check(normed, ref_normed, dtype)
    _check(new_residual, ref_residual, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_silu_and_mul import silu_and_mul

    x = (4 * torch.randn(257, 2 * 14336, device="cuda")).to(dtype)
    _check(silu_and_mul(x), reference.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype):
    from greenroom.kernels import reference
    from greenroom.kernels.triton_rotary import apply_rotary

    num_tokens, hq, hkv = 300, 32, 8
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * HEAD_DIM, device="cuda").to(dtype)
    q = qkv[:, : hq * HEAD_DIM].view(num_tokens, hq, HEAD_DIM)
    k = qkv[:, hq * HEAD_DIM : (hq + hkv) * HEAD_DIM].view(num_tokens, hkv, HEAD_DIM)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    q_out, k_out = apply_rotary(
        q, k, positions, cache, q_out=_nan_like(q.contiguous()), k_out=_nan_like(k.contiguous())
    )
    q_ref, k_ref = reference.apply_rotary(q, k, positions, cache)
    _check(q_out, q_ref, dtype)
    _check(k_out, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_kv(dtype):
    """The fused pass stores exactly what the Triton rotary then the KV write store."""
    from greenroom.kernels.triton_kv_cache import write_kv_cache
    from greenroom.kernels.triton_rotary import apply_rotary
    from greenroom.kernels.triton_rotary_write_kv import rotary_write_kv

    kv = inputs.make_paged_kv([100, 2000], PAGE, 8, HEAD_DIM, dtype, "cuda", extra_blocks=200)
    num_tokens, hq, hkv = 300, 32, 8
    slots = torch.randperm(200 * PAGE, device="cuda")[:num_tokens] + (kv.pool.shape[0] - 200) * PAGE
    slots[::10] = -1
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * HEAD_DIM, device="cuda").to(dtype)
    q, k, v = (t.view(num_tokens, -1, HEAD_DIM) for t in qkv.split([hq * HEAD_DIM, hkv * HEAD_DIM,
                                                                     hkv * HEAD_DIM], dim=-1))  # fmt: skip
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    expected = kv.pool.clone()
    q_ref, k_ref = apply_rotary(q, k, positions, cache)
    write_kv_cache(k_ref, v, expected[:, 1, 0], expected[:, 1, 1], slots)
    q_out = rotary_write_kv(q, k, v, positions, cache, kv.k_cache, kv.v_cache, slots)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(kv.pool.nan_to_num(7.0), expected.nan_to_num(7.0))


def test_ops_dispatch_uses_triton_on_cuda():
    from greenroom.kernels import ops

    backends = ops.active_backends(torch.device("cuda"))
    assert set(backends.values()) == {"triton"}, backends
