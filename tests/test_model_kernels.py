"""Kernel references against dense float64 attention, and the dispatch layer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.kernels import ops, reference

BS, HQ, HKV, D, LAYERS = 4, 8, 2, 16, 3


def make_pool(num_blocks: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, LAYERS, 2, BS, HKV, D, generator=gen)


def layer_caches(pool: torch.Tensor, layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return pool[:, layer, 0], pool[:, layer, 1]


def random_tables(lens: list[int], num_blocks: int, seed: int) -> torch.Tensor:
    """Disjoint shuffled block tables (never the null block), padded with 0."""
    perm = (
        torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    ).tolist()
    width = max(math.ceil(n / BS) for n in lens)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for row, n in enumerate(lens):
        for j in range(math.ceil(n / BS)):
            table[row, j] = perm.pop()
    return table


def dense_kv(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([cache[int(b)] for b in table_row])[:n].double()


def dense_attention(q, k, v, causal_offset: int | None) -> torch.Tensor:
    """q [n, Hq, D], k/v [ctx, Hkv, D] in float64; query i sees keys <= offset + i."""
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(D)
    if causal_offset is not None:
        qi = torch.arange(q.shape[0]).unsqueeze(1) + causal_offset
        scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > qi, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_pool_views_have_block_stride() -> None:
    pool = make_pool(6, 0)
    k_cache, _ = layer_caches(pool)
    assert k_cache.shape == (6, BS, HKV, D)
    assert k_cache.stride(0) == LAYERS * 2 * BS * HKV * D and k_cache[0].is_contiguous()


def test_write_kv_cache_writes_only_the_slots() -> None:
    pool = make_pool(6, 0)
    before = pool.clone()
    k_cache, v_cache = layer_caches(pool)
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    slots = torch.tensor([2 * BS + 1, 5 * BS + 3, 1 * BS + 0])
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    for i, (block, off) in enumerate([(2, 1), (5, 3), (1, 0)]):
        assert torch.equal(pool[block, 1, 0, off], k[i]) and torch.equal(
            pool[block, 1, 1, off], v[i]
        )
        before[block, 1, 0, off], before[block, 1, 1, off] = k[i], v[i]
    assert torch.equal(pool, before)


@pytest.mark.parametrize("num_splits", [None, 1, 3, 64])
def test_decode_attention_matches_dense(num_splits: int | None) -> None:
    pool = make_pool(64, 1)
    k_cache, v_cache = layer_caches(pool)
    lens = [1, 5, 17, 40, 8]
    table = random_tables(lens, 64, 2)
    q = torch.randn(len(lens), HQ, D)
    out = ops.paged_decode_attention(
        q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), D**-0.5, num_splits
    )
    for b, n in enumerate(lens):
        ref = dense_attention(
            q[b : b + 1], dense_kv(k_cache, table[b], n), dense_kv(v_cache, table[b], n), None
        )
        torch.testing.assert_close(out[b].double(), ref[0], atol=1e-5, rtol=1e-5)


def test_partials_over_a_split_context_merge_to_the_whole() -> None:
    pool = make_pool(32, 3)
    k_cache, v_cache = layer_caches(pool)
    lens = torch.tensor([9, 30, 12], dtype=torch.int32)
    table = random_tables(lens.tolist(), 32, 4)
    q = torch.randn(3, HQ, D)
    whole, whole_lse = reference.paged_decode_attention_partial(
        q, k_cache, v_cache, table, lens, 0.25
    )
    # rank 0 holds blocks 0..1, rank 1 the rest; sequence 0 has nothing on a third, empty rank
    first = reference.paged_decode_attention_partial(
        q, k_cache, v_cache, table[:, :2], lens.clamp(max=2 * BS), 0.25
    )
    rest = reference.paged_decode_attention_partial(
        q, k_cache, v_cache, table[:, 2:], (lens - 2 * BS).clamp(min=0), 0.25
    )
    empty = reference.paged_decode_attention_partial(
        q, k_cache, v_cache, table[:, :1], torch.zeros(3, dtype=torch.int32), 0.25
    )
    assert torch.isinf(empty[1]).all() and (empty[0] == 0).all()
    outs = torch.stack([first[0], rest[0], empty[0]])
    lses = torch.stack([first[1], rest[1], empty[1]])
    merged, merged_lse = ops.merge_attn_states(outs, lses)
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    lse_values=st.lists(
        st.one_of(st.just(float("-inf")), st.floats(-30, 30)), min_size=12, max_size=12
    ),
)
def test_merge_is_the_exact_log_sum_exp_combine(n: int, lse_values: list[float]) -> None:
    lses = torch.tensor(lse_values[: n * 3]).view(n, 3)
    outs = torch.randn(n, 3, D, dtype=torch.float64).float()
    out, lse = reference.merge_attn_states(outs, lses)
    expect_lse = torch.logsumexp(lses.double(), 0)
    assert torch.equal(torch.isinf(lse), torch.isinf(expect_lse))
    w = torch.exp(lses.double() - expect_lse.nan_to_num(neginf=0.0))
    expect = (w.unsqueeze(-1) * outs.double()).sum(0)
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any()


def test_prefill_with_cached_prefix_matches_dense() -> None:
    pool = make_pool(64, 5)
    k_cache, v_cache = layer_caches(pool)
    cached, new = [0, 7, 12, 3], [6, 1, 9, 4]
    lens = [c + n for c, n in zip(cached, new, strict=True)]
    table = random_tables(lens, 64, 6)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(new), HQ, D)
    out = ops.paged_prefill_attention(
        q, k_cache, v_cache, table, cu, torch.tensor(lens, dtype=torch.int32), D**-0.5, max(new)
    )
    for b, (c, n) in enumerate(zip(cached, new, strict=True)):
        k, v = dense_kv(k_cache, table[b], c + n), dense_kv(v_cache, table[b], c + n)
        ref = dense_attention(q[cu[b] : cu[b + 1]], k, v, causal_offset=c)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)


def test_fused_add_rms_norm() -> None:
    x, res, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    normed, new_res = ops.fused_add_rms_norm(x, res, w, 1e-6)
    s = x + res
    torch.testing.assert_close(new_res, s)
    torch.testing.assert_close(normed, w * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
    normed0, res0 = ops.fused_add_rms_norm(x, None, w, 1e-6)
    assert res0 is x
    torch.testing.assert_close(normed0, ops.rms_norm(x, w, 1e-6))


def test_rotary_matches_transformers_rotate_half() -> None:
    transformers_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from greenroom.models.rope import cos_sin_cache

    cache = cos_sin_cache(D, 64, 10000.0)
    positions = torch.tensor([0, 3, 63, 17])
    q, k = torch.randn(4, HQ, D), torch.randn(4, HKV, D)
    out_q, out_k = ops.apply_rotary(q, k, positions, cache)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    ref_q, ref_k = transformers_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)


def test_dispatch_uses_references_on_cpu_and_registered_kernels_on_cuda() -> None:
    calls = []
    ops.register("rms_norm", lambda x, w, eps: calls.append(x) or x)
    try:
        x = torch.randn(2, 8)
        ops.rms_norm(x, torch.ones(8), 1e-6)
        assert calls == []  # CPU tensors never take a registered GPU kernel
        assert ops.implementation("rms_norm", torch.device("cuda")) is not reference.rms_norm
        ops.set_backend("reference")
        assert ops.implementation("rms_norm", torch.device("cuda")) is reference.rms_norm
        assert ops.active_backends(torch.device("cpu"))["rms_norm"] == "reference"
    finally:
        ops.set_backend("auto")
        ops._triton.pop("rms_norm", None)
    with pytest.raises(ValueError, match="unknown kernel 'flash'"):
        ops.register("flash", lambda: None)
    with pytest.raises(ValueError, match="backend 'fast'"):
        ops.set_backend("fast")  # type: ignore[arg-type]
