"""Prefill graphs' padding (CPU: the padded forward a graph records, run eagerly) and the
attention tile lists they launch over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from greenroom.config import KVConfig, ModelConfig
from greenroom.kernels.prefill_tiles import UNUSED_TILE, max_tiles, prefill_tiles
from greenroom.models import ModelRunner
from greenroom.models.batch import SequenceChunk
from greenroom.models.prefill_graphs import PrefillGraphs, default_token_sizes

BS = 16


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(ModelConfig(), KVConfig(tokens_per_block=BS, num_blocks=64), None, "cpu")


# ------------------------------------------------------------------ tile lists


@pytest.mark.parametrize("block_m", [16, 64])
def test_tiles_cover_every_query_block_once_busiest_first(block_m):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 9))
        q_lens = rng.integers(1, 300, n)
        context = q_lens + rng.integers(0, 500, n)
        num_tiles = max_tiles(int(q_lens.sum()), n, block_m)
        tiles = prefill_tiles(q_lens, context, num_tiles, block_m)
        assert tiles.shape == (2, num_tiles) and tiles.dtype == np.int32
        used = tiles[:, tiles[1] != UNUSED_TILE]
        expected = {(r, b) for r in range(n) for b in range(-(-int(q_lens[r]) // block_m))}
        assert sorted(map(tuple, used.T.tolist())) == sorted(expected)
        assert (tiles[1, used.shape[1] :] == UNUSED_TILE).all()  # unused ones last
        prefix = context[used[0]] - q_lens[used[0]]
        keys = np.minimum(prefix + (used[1] + 1) * block_m, context[used[0]])
        assert (np.diff(keys) <= 0).all()


def test_tiles_refuse_a_batch_past_their_length():
    with pytest.raises(ValueError, match="needs 3 attention tiles but only 2 fit"):
        prefill_tiles([65, 10], [65, 10], 2, 64)
    assert max_tiles(130, 3, 64) == 6


def test_default_token_sizes():
    assert default_token_sizes(1000) == [64, 128, 256, 512, 768, 1024]
    assert default_token_sizes(4096)[-1] == 4096 and len(default_token_sizes(4096)) == 18
    assert default_token_sizes(40) == [64]


# ------------------------------------------------------------------ padded forward


def _chunks() -> list[SequenceChunk]:
    """Three requests: one with a cached prefix ending mid-block, one fresh, one decode-like."""
    return [
        SequenceChunk(list(range(3, 3 + 21)), 0, [1, 2]),
        SequenceChunk([7, 8, 9, 10, 11], 19, [3, 4]),
        SequenceChunk([42], 30, [5, 6]),
    ]


def _prime(runner: ModelRunner) -> None:
    """The cached prefixes of requests 2 and 3 in their blocks."""
    runner.kv_pool.zero_()
    prefixes = [
        SequenceChunk(list(range(100, 119)), 0, [3, 4]),
        SequenceChunk(list(range(30)), 0, [5, 6]),
    ]
    runner.forward(runner.build_batch(prefixes), graphs="none")


@pytest.mark.parametrize("sizes", [[64], [32, 48, 128]])
def test_padded_forward_equals_the_plain_forward(runner, sizes):
    chunks = _chunks()
    _prime(runner)
    expected = runner.forward(runner.build_batch(chunks), graphs="none")
    pool_after = runner.kv_pool.clone()

    _prime(runner)
    graphs = PrefillGraphs(
        runner.model,
        runner.kv_pool,
        runner.max_blocks_per_seq,
        sizes,
        max_requests=5,
        capture=False,
    )
    batch = runner.build_batch(chunks)
    assert graphs.size_for(batch) == next(s for s in sorted(sizes) if s >= 27)
    got = graphs.padded_forward(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # real blocks hold the same KV; padding only ever wrote into the null block
    torch.testing.assert_close(runner.kv_pool[1:], pool_after[1:], rtol=1e-5, atol=1e-5)


def test_static_buffers_are_reset_between_batches(runner):
    """A smaller batch after a larger one: no stale request, slot or logits row leaks in."""
    graphs = PrefillGraphs(
        runner.model, runner.kv_pool, runner.max_blocks_per_seq, [64], max_requests=4, capture=False
    )
    _prime(runner)
    graphs.padded_forward(runner.build_batch(_chunks()))
    small = [SequenceChunk([5, 6, 7], 0, [7])]
    runner.kv_pool[7].zero_()
    expected = runner.forward(runner.build_batch(small), graphs="none")
    kv_expected = runner.kv_pool[7].clone()
    runner.kv_pool[7].zero_()
    got = graphs.padded_forward(runner.build_batch(small))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.kv_pool[7], kv_expected)
    assert graphs.slot_mapping[3:].eq(graphs.pad_slot).all()
    assert graphs.cu_seqlens_q[2:].eq(3).all() and graphs.logits_indices[1:].eq(0).all()


def test_batches_past_the_captured_shapes_run_eagerly(runner):
    graphs = PrefillGraphs(
        runner.model, runner.kv_pool, runner.max_blocks_per_seq, [16], max_requests=2, capture=False
    )
    chunks = _chunks()
    assert graphs.size_for(runner.build_batch(chunks[2:])) == 16
    assert graphs.size_for(runner.build_batch(chunks[:1])) is None  # 21 tokens > 16
    assert graphs.size_for(runner.build_batch(chunks[1:] + chunks[2:])) is None  # 3 requests
    assert graphs.size_for(runner.build_batch(chunks[2:], all_logits=True)) is None
    with pytest.raises(ValueError, match="does not fit"):
        graphs.padded_forward(runner.build_batch(chunks[:1]))
    # the runner falls back to the eager forward when no prefill graph fits
    assert runner.prefill_graphs is None
    out = runner.forward(runner.build_batch(chunks[:1]), graphs="prefill")
    assert out.shape == (1, runner.vocab_size)


def test_prefill_graphs_need_a_gpu_and_cuda_graphs_on(runner):
    assert runner.capture_prefill_graphs(max_num_tokens=256) == []
    assert runner.prefill_graphs is None


def test_a_mixed_step_with_decode_rows_first_pads_to_the_eager_result(runner):
    chunks = _chunks()[::-1]  # decode row first, as the scheduler orders a mixed step
    _prime(runner)
    batch = runner.build_batch(chunks)
    assert batch.decode_rows == 1
    expected = runner.forward(batch, graphs="none")  # eager: decode rows in the decode kernel
    _prime(runner)
    graphs = PrefillGraphs(
        runner.model, runner.kv_pool, runner.max_blocks_per_seq, [64], max_requests=8,
        capture=False,
    )  # fmt: skip
    got = graphs.padded_forward(runner.build_batch(chunks))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class Recorder:
    """Stands in for a set of mixed-step graphs: runs any batch, counts its runs."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.ran = 0

    def can_run(self, batch) -> bool:
        return True

    def run(self, batch):
        self.ran += 1
        return torch.zeros(batch.num_requests, self.vocab_size)


def test_mixed_graphs_run_mixed_steps_of_the_decode_engines_only(runner, monkeypatch):
    """Each decode graph kind replays the mixed graphs captured on its own stream: the
    partition's for ``decode``, the whole GPU's for ``decode_whole``."""
    part, whole = Recorder(runner.vocab_size), Recorder(runner.vocab_size)
    monkeypatch.setattr(runner, "mixed_graphs", part)
    monkeypatch.setattr(runner, "whole_mixed_graphs", whole)
    _prime(runner)
    mixed = runner.build_batch(_chunks())
    runner.forward(mixed, graphs="none")  # eager on request
    runner.forward(mixed, graphs="prefill")  # the context engine's graphs only
    assert (part.ran, whole.ran) == (0, 0)
    runner.forward(mixed, graphs="decode")
    assert (part.ran, whole.ran) == (1, 0)
    runner.forward(mixed, graphs="decode_whole")
    assert (part.ran, whole.ran) == (1, 1)
    runner.forward(runner.build_batch(_chunks()[2:]), graphs="decode")  # decode-only: not mixed
    runner.forward(runner.build_batch(_chunks()[2:]), graphs="decode_whole")
    assert (part.ran, whole.ran) == (1, 1)
    # no whole-GPU mixed graphs: a mixed step there runs eagerly, never on the partition's
    monkeypatch.setattr(runner, "whole_mixed_graphs", None)
    out = runner.forward(mixed, graphs="decode_whole")
    assert (part.ran, whole.ran) == (1, 1) and out.shape == (3, runner.vocab_size)


@pytest.mark.parametrize("max_mixed_tokens", [512, 0])
def test_whole_gpu_capture_adds_mixed_graphs_on_its_stream(monkeypatch, max_mixed_tokens):
    """``capture_cuda_graphs(whole_gpu=True)`` captures a second mixed set on the whole-GPU
    stream (the partition's set stays as it was), under the same token knob."""
    import greenroom.models.runner as runner_mod

    captured: list[tuple[str, object]] = []

    class FakeDecode:
        def __init__(self, model, kv_pool, max_blocks, sizes, stream) -> None:
            captured.append(("decode", stream))
            self.batch_sizes = sizes

    class FakeMixed:
        def __init__(self, model, kv_pool, max_blocks, sizes, max_requests, stream) -> None:
            captured.append(("mixed", stream))
            self.token_sizes, self.max_requests = sizes, max_requests

    monkeypatch.setattr(runner_mod, "DecodeGraphs", FakeDecode)
    monkeypatch.setattr(runner_mod, "PrefillGraphs", FakeMixed)
    cfg = ModelConfig(cuda_graph_max_batch_size=16, cuda_graph_max_mixed_tokens=max_mixed_tokens)
    r = ModelRunner(cfg, KVConfig(tokens_per_block=BS, num_blocks=8), None, "cpu")
    r.device = torch.device("cuda")  # the capture path, with stand-in graphs
    part, whole = object(), object()
    assert r.capture_cuda_graphs(stream=part) == [1, 2, 4, 8, 16]
    partition_mixed = r.mixed_graphs
    assert r.capture_cuda_graphs(stream=whole, whole_gpu=True) == [1, 2, 4, 8, 16]
    assert r.mixed_graphs is partition_mixed
    if not max_mixed_tokens:
        assert captured == [("decode", part), ("decode", whole)]
        assert r.mixed_graphs is None and r.whole_mixed_graphs is None
        return
    assert captured == [("decode", part), ("mixed", part), ("decode", whole), ("mixed", whole)]
    assert r.whole_mixed_graphs is not r.mixed_graphs
    assert r.whole_mixed_graphs.token_sizes == default_token_sizes(max_mixed_tokens)
    assert r.whole_mixed_graphs.max_requests == 16
