"""Triton kernels in interpreter mode (CPU, fp32, tiny shapes) against the torch references.

Not collected directly: tests/test_kernels_interpreter.py runs this file in a fresh Python
with TRITON_INTERPRET=1, which must be set before triton is first imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels_inputs as inputs  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from greenroom.kernels import reference  # noqa: E402
from greenroom.kernels.triton_decode_attention import (  # noqa: E402
    _decode_kernel,
    paged_decode_attention,
    paged_decode_attention_partial,
)
from greenroom.kernels.triton_kv_cache import write_kv_cache  # noqa: E402
from greenroom.kernels.triton_merge_attn_states import merge_attn_states  # noqa: E402
from greenroom.kernels.triton_prefill_attention import paged_prefill_attention  # noqa: E402
from greenroom.kernels.triton_rms_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from greenroom.kernels.triton_rotary import apply_rotary  # noqa: E402
from greenroom.kernels.triton_rotary_write_kv import rotary_write_kv  # noqa: E402
from greenroom.kernels.triton_silu_and_mul import silu_and_mul  # noqa: E402

TOL = 1e-4
HEAD_DIM = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_interpreter_mode_is_active():
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ["TRITON_INTERPRET"] == "1"
    assert isinstance(_decode_kernel, InterpretedFunction)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("page", [4, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads_first", [0, 1])
def test_decode_attention(num_q_heads, num_kv_heads, page, num_splits, heads_first):
    context_lens = [0, 1, 2 * page + 3, 45]
    kv = inputs.make_paged_kv(context_lens, page, num_kv_heads, HEAD_DIM, torch.float32, "cpu")
    q = torch.randn(len(context_lens), num_q_heads, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    k_ref, v_ref = kv.clean()
    args = (kv.block_tables, kv.context_lens, scale)
    ref_out, ref_lse = reference.paged_decode_attention_partial(q, k_ref, v_ref, *args)

    out = torch.full_like(q, float("nan"))
    paged_decode_attention(
        q, kv.k_cache, kv.v_cache, *args, num_splits, out=out, heads_first=heads_first
    )
    assert inputs.rel_err(out, ref_out) <= TOL

    out, lse = paged_decode_attention_partial(
        q, kv.k_cache, kv.v_cache, *args, num_splits, heads_first=heads_first
    )
    assert inputs.rel_err(out, ref_out) <= TOL
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isneginf(ref_lse[0]).all()
    torch.testing.assert_close(lse[1:], ref_lse[1:], rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "window,page,num_splits", [(1, 4, 1), (5, 16, 3), (20, 4, 3), (20, 16, 1), (1000, 4, 3)]
)
def test_decode_attention_windowed(window, page, num_splits):
    """Sliding window: the last `window` tokens only; slots before them are NaN, so a kernel
    that reads a block (or a token) wholly outside the window fails."""
    context_lens = [0, 1, 2 * page + 3, 45, 6]
    kv = inputs.make_paged_kv(context_lens, page, 2, HEAD_DIM, torch.float32, "cpu")
    q = torch.randn(len(context_lens), 8, HEAD_DIM)
    args = (kv.block_tables, kv.context_lens, HEAD_DIM**-0.5)
    k_ref, v_ref = kv.clean()
    ref_out, ref_lse = reference.paged_decode_attention_partial(
        q, k_ref, v_ref, *args, window=window
    )
    split_ref = reference.paged_decode_attention(q, k_ref, v_ref, *args, 3, window=window)
    assert inputs.rel_err(split_ref, ref_out) <= TOL
    if window < 45:  # the window changes the answer
        full, _ = reference.paged_decode_attention_partial(q, k_ref, v_ref, *args)
        assert inputs.rel_err(full[3], ref_out[3]) > 1e-2
    inputs.poison_before(kv, [n - window for n in context_lens])

    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kv.k_cache, kv.v_cache, *args, num_splits, window, out=out)
    assert inputs.rel_err(out, ref_out) <= TOL
    out, lse = paged_decode_attention_partial(q, kv.k_cache, kv.v_cache, *args, num_splits, window)
    assert inputs.rel_err(out, ref_out) <= TOL
    assert torch.isneginf(lse[0]).all()
    torch.testing.assert_close(lse[1:], ref_lse[1:], rtol=TOL, atol=TOL)


def test_decode_split_parts_merge_to_whole():
    """Partials over two halves of each block table, merged, equal attention over the whole."""
    page, context_lens = 4, [9, 16, 3]
    kv = inputs.make_paged_kv(context_lens, page, 2, HEAD_DIM, torch.float32, "cpu")
    q = torch.randn(3, 8, HEAD_DIM)
    whole, whole_lse = paged_decode_attention_partial(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.3
    )
    cut = 2  # blocks in the first part: request 2 (3 tokens) has nothing in the second part
    first_lens = kv.context_lens.clamp(max=cut * page)
    second_lens = kv.context_lens - first_lens
    parts = [
        paged_decode_attention_partial(q, kv.k_cache, kv.v_cache, table, lens, 0.3)
        for table, lens in (
            (kv.block_tables[:, :cut], first_lens),
            (kv.block_tables[:, cut:].contiguous(), second_lens),
        )
    ]
    assert torch.isneginf(parts[1][1][2]).all()
    out, lse = merge_attn_states(
        torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    )
    assert inputs.rel_err(out, whole) <= TOL
    torch.testing.assert_close(lse, whole_lse, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("num_parts", [1, 3])
def test_merge_attn_states(num_parts):
    outs = torch.randn(num_parts, 2, 3, 4, HEAD_DIM)
    lses = torch.randn(num_parts, 2, 3, 4) * 4
    lses[0, 0, 0, 1] = float("-inf")
    outs[0, 0, 0, 1] = float("nan")  # an empty part's output is never read into the sum
    lses[:, 1, 2, 3] = float("-inf")  # every part empty
    out, lse = merge_attn_states(outs, lses)
    clean = outs.nan_to_num(0.0)
    ref_out, ref_lse = reference.merge_attn_states(clean, lses)
    assert inputs.rel_err(out, ref_out) <= TOL
    assert torch.equal(out[1, 2, 3], torch.zeros(HEAD_DIM))
    assert torch.isneginf(lse[1, 2, 3])
    torch.testing.assert_close(lse, ref_lse, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("page", [4, 16])
def test_prefill_attention(num_q_heads, num_kv_heads, page):
    # (cached prefix, new tokens): prefixes end mid-block, one request has no prefix.
    requests = [(2 * page + 1, 7), (0, 19), (page - 1, 1), (5, 2 * page)]
    context_lens = [p + n for p, n in requests]
    kv = inputs.make_paged_kv(context_lens, page, num_kv_heads, HEAD_DIM, torch.float32, "cpu")
    q_lens = [n for _, n in requests]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_q_heads, HEAD_DIM)
    args = (kv.block_tables, cu, kv.context_lens, HEAD_DIM**-0.5, max(q_lens))
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, kv.k_cache, kv.v_cache, *args, out=out)
    k_ref, v_ref = kv.clean()
    ref = reference.paged_prefill_attention(q, k_ref, v_ref, *args)
    assert inputs.rel_err(out, ref) <= TOL


@pytest.mark.parametrize(
    "window,page,block_m", [(1, 4, 16), (6, 16, 32), (17, 4, 32), (17, 16, 16), (1000, 4, 16)]
)
def test_prefill_attention_windowed(window, page, block_m):
    """Sliding window over cached prefixes and across chunk edges; keys older than any query's
    window (below the chunk holding the first one's oldest key) are NaN and never read."""
    requests = [(2 * page + 1, 7), (0, 37), (page - 1, 1), (5, 2 * page), (40, 9)]
    context_lens = [p + n for p, n in requests]
    kv = inputs.make_paged_kv(context_lens, page, 2, HEAD_DIM, torch.float32, "cpu")
    q_lens = [n for _, n in requests]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 8, HEAD_DIM)
    args = (kv.block_tables, cu, kv.context_lens, HEAD_DIM**-0.5, max(q_lens))
    k_ref, v_ref = kv.clean()
    ref = reference.paged_prefill_attention(q, k_ref, v_ref, *args, window=window)
    if window < 37:
        full = reference.paged_prefill_attention(q, k_ref, v_ref, *args)
        assert inputs.rel_err(full, ref) > 1e-2
    inputs.poison_before(kv, inputs.window_unread_before(requests, window, 16))
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, kv.k_cache, kv.v_cache, *args, out=out, block_m=block_m, block_n=16, window=window
    )
    assert inputs.rel_err(out, ref) <= TOL


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("window", [0, 6])
def test_prefill_attention_tiled(block_m, window):
    """The fixed-shape launch (CUDA graphs): a tile list, padded rows and requests past the
    batch. Covered rows equal the reference; rows no tile covers are left untouched."""
    from greenroom.kernels.prefill_tiles import max_tiles, prefill_tiles

    page, num_q_heads, num_kv_heads = 4, 4, 2
    requests = [(2 * page + 1, 7), (0, 37), (page - 1, 1), (5, 2 * page)]
    context_lens = [p + n for p, n in requests]
    kv = inputs.make_paged_kv(context_lens, page, num_kv_heads, HEAD_DIM, torch.float32, "cpu")
    q_lens = [n for _, n in requests]
    real = sum(q_lens)
    padded_tokens, padded_requests = real + 11, len(requests) + 3
    cu = torch.full((padded_requests + 1,), real, dtype=torch.int32)
    cu[: len(requests) + 1] = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    lens = torch.ones(padded_requests, dtype=torch.int32)
    lens[: len(requests)] = kv.context_lens
    tables = torch.zeros((padded_requests, kv.block_tables.shape[1]), dtype=torch.int32)
    tables[: len(requests)] = kv.block_tables
    n = max_tiles(padded_tokens, padded_requests, block_m)
    tiles = torch.from_numpy(prefill_tiles(q_lens, context_lens, n, block_m, window))
    q = torch.randn(padded_tokens, num_q_heads, HEAD_DIM)
    out = torch.full_like(q, float("nan"))
    args = (HEAD_DIM**-0.5, padded_tokens)
    k_ref, v_ref = kv.clean()
    if window:
        inputs.poison_before(kv, inputs.window_unread_before(requests, window, 16))
    paged_prefill_attention(
        q, kv.k_cache, kv.v_cache, tables, cu, lens, *args,
        out=out, block_m=block_m, block_n=16, tiles=tiles, window=window,
    )  # fmt: skip
    ref = reference.paged_prefill_attention(
        q[:real], k_ref, v_ref, kv.block_tables, cu[: len(requests) + 1], kv.context_lens, *args,
        window=window,
    )  # fmt: skip
    assert inputs.rel_err(out[:real], ref) <= TOL
    assert out[real:].isnan().all()


@pytest.mark.parametrize("page", [4, 16])
def test_write_kv_cache(page):
    kv = inputs.make_paged_kv([page + 2], page, 2, HEAD_DIM, torch.float32, "cpu", extra_blocks=4)
    slots = torch.tensor([page * 2 + 1, -1, page * 3, page * 2 + 2, page * 4 + page - 1])
    k = torch.randn(len(slots), 2, HEAD_DIM)
    v = torch.randn(len(slots), 2, HEAD_DIM)
    expected = kv.pool.clone()
    layer_k, layer_v = expected[:, 1, 0], expected[:, 1, 1]
    keep = slots >= 0
    reference.write_kv_cache(k[keep], v[keep], layer_k, layer_v, slots[keep])
    write_kv_cache(k, v, kv.k_cache, kv.v_cache, slots)
    assert torch.equal(kv.pool.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(with_residual):
    x = torch.randn(5, 48)
    weight = torch.randn(48)
    if not with_residual:
        out = torch.full_like(x, float("nan"))
        rms_norm(x, weight, 1e-6, out=out)
        assert inputs.rel_err(out, reference.rms_norm(x, weight, 1e-6)) <= TOL
        return
    residual = torch.randn(5, 48)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert inputs.rel_err(normed, ref_normed) <= TOL
    assert inputs.rel_err(new_residual, ref_residual) <= TOL


def test_rotary():
    num_tokens, hq, hkv = 6, 4, 2
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * HEAD_DIM)
    q = qkv[:, : hq * HEAD_DIM].view(num_tokens, hq, HEAD_DIM)  # strided views, as in the model
    k = qkv[:, hq * HEAD_DIM : (hq + hkv) * HEAD_DIM].view(num_tokens, hkv, HEAD_DIM)
    positions = torch.tensor([0, 5, 17, 3, 30, 31])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(32).float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    q_out, k_out = apply_rotary(q, k, positions, cache)
    q_ref, k_ref = reference.apply_rotary(q, k, positions, cache)
    assert inputs.rel_err(q_out, q_ref) <= TOL and inputs.rel_err(k_out, k_ref) <= TOL


@pytest.mark.parametrize("page", [4, 16])
def test_rotary_write_kv(page):
    """The fused pass equals rotary then the KV write; rows with a negative slot write
    nothing (their q is still rotated)."""
    hq, hkv = 4, 2
    kv = inputs.make_paged_kv([page + 2], page, hkv, HEAD_DIM, torch.float32, "cpu", extra_blocks=4)
    slots = torch.tensor([page * 2 + 1, -1, page * 3, page * 2 + 2, page * 4 + page - 1])
    n = len(slots)
    qkv = torch.randn(n, (hq + 2 * hkv) * HEAD_DIM)
    q, k, v = (t.view(n, -1, HEAD_DIM) for t in qkv.split([hq * HEAD_DIM, hkv * HEAD_DIM,
                                                            hkv * HEAD_DIM], dim=-1))  # fmt: skip
    positions = torch.tensor([0, 5, 17, 3, 30])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    cache = torch.cat([torch.outer(torch.arange(32).float(), inv_freq).cos(),
                       torch.outer(torch.arange(32).float(), inv_freq).sin()], dim=-1)  # fmt: skip
    expected = kv.pool.clone()
    keep = slots >= 0
    q_ref, k_ref = reference.apply_rotary(q, k, positions, cache)
    reference.write_kv_cache(
        k_ref[keep], v[keep], expected[:, 1, 0], expected[:, 1, 1], slots[keep]
    )
    q_out = rotary_write_kv(q, k, v, positions, cache, kv.k_cache, kv.v_cache, slots)
    assert inputs.rel_err(q_out, q_ref) <= TOL
    torch.testing.assert_close(
        kv.pool.nan_to_num(7.0), expected.nan_to_num(7.0), rtol=TOL, atol=TOL
    )
    # the reference is the same composition (rows with a slot only)
    again = kv.pool.clone()
    q_again = reference.rotary_write_kv(
        q[keep], k[keep], v[keep], positions[keep], cache, again[:, 1, 0], again[:, 1, 1],
        slots[keep],
    )  # fmt: skip
    assert inputs.rel_err(q_again, q_ref[keep]) <= TOL
    torch.testing.assert_close(again.nan_to_num(7.0), expected.nan_to_num(7.0), rtol=TOL, atol=TOL)


def test_silu_and_mul():
    x = torch.randn(3, 2, 2 * 1500)  # more than one column block, a ragged last one
    out = silu_and_mul(x)
    assert out.shape == (3, 2, 1500)
    assert inputs.rel_err(out, reference.silu_and_mul(x)) <= TOL
    strided = torch.randn(5, 4 * 40)[:, ::2]  # a non-contiguous input is copied first
    assert inputs.rel_err(silu_and_mul(strided), reference.silu_and_mul(strided)) <= TOL
