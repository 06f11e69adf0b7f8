"""Decode steps as two nano-batches: the same logits and KV as the plain forward (CPU, float32),
the schedule's stream edges (fake streams), a node's greedy tokens, and decode CUDA graphs
captured with the split (GPU)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import TINY_DIMS, random_prompts, save_checkpoint, transformers_greedy

from greenroom.config import KVConfig, ModelConfig, load_config
from greenroom.models import ForwardBatch, ModelRunner, SequenceChunk
from greenroom.models import llama as llama_module
from greenroom.models.nano_batches import (
    ATTENTION,
    NanoBatches,
    run_nano_batches,
    split_decode_batch,
    split_rows,
)

transformers = pytest.importorskip("transformers")

TPB = 4
MAIN = 0  # the caller's stream in FakeStreams


def cpu_runner(**model) -> ModelRunner:
    cfg = ModelConfig(dtype="float32", **model)
    return ModelRunner(cfg, KVConfig(tokens_per_block=TPB, num_blocks=256), None, "cpu")


def decode_batch(runner: ModelRunner, rows: int, seed: int) -> ForwardBatch:
    """``rows`` decode rows of different context lengths (2 to 40 cached tokens), each over
    its own blocks of a KV pool filled with random values."""
    gen = torch.Generator().manual_seed(seed)
    runner.kv_pool.copy_(torch.randn(runner.kv_pool.shape, generator=gen))
    cached = torch.randint(2, 41, (rows,), generator=gen).tolist()
    per_row = math.ceil(41 / TPB)
    chunks = [
        SequenceChunk(
            [int(torch.randint(3, runner.vocab_size, (1,), generator=gen))],
            n,
            list(range(1 + r * per_row, 1 + (r + 1) * per_row)),
        )
        for r, n in enumerate(cached)
    ]
    return runner.build_batch(chunks)


def test_split_rows_aligns_half_a_where_the_batch_allows() -> None:
    assert split_rows(414) == 208 and split_rows(256) == 128 and split_rows(19) == 16
    assert split_rows(9) == 8 and split_rows(5) == 3 and split_rows(2) == 1
    with pytest.raises(ValueError):
        split_rows(1)


def test_split_decode_batch_takes_views_of_each_rows_arrays() -> None:
    runner = cpu_runner()
    batch = decode_batch(runner, 7, seed=1)
    a, b = split_decode_batch(batch, 3)
    assert (a.num_requests, b.num_requests) == (3, 4)
    for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens"):
        whole = getattr(batch, name)
        assert torch.equal(torch.cat([getattr(a, name), getattr(b, name)]), whole), name
        assert getattr(b, name).data_ptr() == whole[3:].data_ptr(), f"{name} is not a view"
    assert b.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4] and b.logits_indices.tolist() == [0, 1, 2, 3]
    assert b.host_lens is not None and b.host_lens[1].tolist() == batch.host_lens[1][3:].tolist()
    prefill = runner.build_batch([SequenceChunk([5, 6], 0, [1]), SequenceChunk([7], 3, [2])])
    with pytest.raises(ValueError, match="decode-only"):
        split_decode_batch(prefill, 1)


@pytest.mark.parametrize("attention_stream", [False, True])
@pytest.mark.parametrize("rows", [3, 9, 19])
def test_nano_batches_give_the_plain_forwards_logits_and_kv(
    rows: int, attention_stream: bool, monkeypatch
) -> None:
    runner = cpu_runner()
    batch = decode_batch(runner, rows, seed=rows)
    pool = runner.kv_pool.clone()
    plain = runner.model.forward(batch, runner.kv_pool)
    plain_pool = runner.kv_pool.clone()
    runner.kv_pool.copy_(pool)
    calls = []

    def counted(*args):
        calls.append(args[1].num_requests)
        return run_nano_batches(*args)

    monkeypatch.setattr(llama_module, "run_nano_batches", counted)
    runner.model.nano = NanoBatches(min_rows=2, attention_stream=attention_stream)
    split = runner.model.forward(batch, runner.kv_pool)
    assert calls == [rows], "the nano-batch schedule did not run"
    assert not torch.equal(plain_pool, pool)  # the step wrote its KV
    torch.testing.assert_close(runner.kv_pool, plain_pool, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=1e-5)
    assert split.shape == (rows, runner.vocab_size)


def test_only_large_decode_only_batches_split(monkeypatch) -> None:
    runner = cpu_runner(decode_nano_batches=True, nano_batch_min_rows=8)
    assert runner.model.nano == NanoBatches(8, attention_stream=False)
    on_own = cpu_runner(decode_nano_batches=True, nano_batch_attention_stream=True)
    assert on_own.model.nano == NanoBatches(256, attention_stream=True)
    assert cpu_runner().model.nano is None  # off by default
    calls = []
    monkeypatch.setattr(llama_module, "run_nano_batches", lambda *a: calls.append(a))
    runner.model.forward(decode_batch(runner, 7, seed=2), runner.kv_pool)
    prefill = runner.build_batch([SequenceChunk(list(range(3, 12)), 0, [1, 2, 3])] * 2)
    runner.model.forward(prefill, runner.kv_pool)
    assert calls == []


class FakeStreams:
    """Streams that log each op with the stream it went to, and the edges between them."""

    def __init__(self, attention_stream: bool) -> None:
        self.attention_stream = attention_stream
        self.ops: list[tuple[int, str]] = []  # (stream, op) in issue order
        self.half = MAIN

    def log(self, op: str) -> None:
        self.ops.append((self.half, op))

    def fork(self) -> None:
        self.log("fork")

    @contextlib.contextmanager
    def on(self, role: int):
        """Two streams: A on the caller's; else A, B on their own, the attention on the
        caller's."""
        if self.attention_stream:
            self.half = MAIN if role == ATTENTION else role + 1
        else:
            self.half = MAIN if role == 0 else 1
        yield
        self.half = MAIN

    def record(self) -> int:
        self.log("record")
        return len(self.ops) - 1

    def wait(self, event: int) -> None:
        self.log(f"wait {event}")

    def join(self) -> None:
        self.log("join")


class FakeLayers:
    """Layer pieces that only log what ran, on which stream."""

    def __init__(self, streams: FakeStreams, num_layers: int) -> None:
        self.streams, self.num_layers = streams, num_layers

    def embed(self, ids):
        self.streams.log("embed")
        return torch.zeros(ids.shape[0], 1)

    def pre(self, index, h, residual, batch, kv_pool):
        self.streams.log(f"pre {index}")
        return h, h

    def attend(self, index, q, batch, kv_pool):
        self.streams.log(f"attend {index}")
        return q

    def post(self, index, attn, residual):
        self.streams.log(f"post {index}")
        return attn, residual


def happens_before(ops: list[tuple[int, str]]) -> list[set[int]]:
    """For each op, the ops that must finish before it: program order on its stream, the fork
    (a side stream starts behind the caller's earlier ops), event waits, and the join (behind
    every side stream's ops)."""
    before: list[set[int]] = []
    last: dict[int, int] = {}
    fork_at = None
    for i, (stream, op) in enumerate(ops):
        deps: set[int] = set()
        if stream in last:
            deps |= before[last[stream]] | {last[stream]}
        elif stream != MAIN and fork_at is not None:
            deps |= before[fork_at] | {fork_at}
        if op.startswith("wait "):
            event = int(op.split()[1])
            deps |= before[event] | {event}
        if op == "join":
            for side, j in last.items():
                deps |= before[j] | {j} if side != MAIN else set()
        if op == "fork":
            fork_at = i
        before.append(deps)
        last[stream] = i
    return before


@pytest.mark.parametrize("attention_stream", [False, True])
def test_schedule_alternates_attention_and_leaves_matmuls_free_to_overlap(
    attention_stream: bool,
) -> None:
    streams = FakeStreams(attention_stream)
    layers = FakeLayers(streams, num_layers=3)
    runner = cpu_runner()
    h, residual = run_nano_batches(layers, decode_batch(runner, 20, seed=3), None, streams)
    assert h.shape == residual.shape == (20, 1)
    ops = streams.ops
    before = happens_before(ops)
    assert ops[0] == (MAIN, "fork") and ops[-1] == (MAIN, "join")
    halves = (1, 2) if attention_stream else (MAIN, 1)  # each half's stream
    assert {s for s, op in ops if op.startswith(("pre", "post", "embed"))} == set(halves)
    at = {
        (halves.index(s), op): i for i, (s, op) in enumerate(ops) if op.startswith(("pre", "post"))
    }
    for h in (0, 1):
        for i in range(3):
            at[(h, f"attend {i}")] = attend_index(ops, h, i)
            assert ops[at[(h, f"attend {i}")]][0] == (MAIN if attention_stream else halves[h])
    for h in (0, 1):  # a half's own layer: pre, then its attention, then post
        for i in range(3):
            assert at[(h, f"pre {i}")] in before[at[(h, f"attend {i}")]]
            assert at[(h, f"attend {i}")] in before[at[(h, f"post {i}")]]
    order = [(half, i) for i in range(3) for half in (0, 1)]  # A0, B0, A1, B1, A2, B2
    for (half, i), (other, j) in zip(order, order[1:], strict=False):
        cur, nxt = at[(half, f"attend {i}")], at[(other, f"attend {j}")]
        assert cur in before[nxt], (ops[cur], ops[nxt])  # attention kernels alternate
        # this half's MLP and next QKV run beside the next attention, the other half's...
        assert nxt not in before[at[(half, f"post {i}")]]
        if i + 1 < 3:
            assert nxt not in before[at[(half, f"pre {i + 1}")]]
        # ...which waits for neither of them, and whose QKV runs beside this attention
        assert at[(half, f"post {i}")] not in before[nxt]
        assert cur not in before[at[(other, f"pre {j}")]]
    join = len(ops) - 1
    assert all(i in before[join] for i, (s, _) in enumerate(ops) if s != MAIN)


def attend_index(ops: list[tuple[int, str]], half: int, layer: int) -> int:
    """Where half ``half``'s attention of ``layer`` is in ``ops`` (attention ops are issued A
    then B within each layer, whatever stream they go to)."""
    found = [i for i, (_, op) in enumerate(ops) if op == f"attend {layer}"]
    assert len(found) == 2
    return found[half]


DIMS = TINY_DIMS
NEW_TOKENS = 12


@pytest.mark.slow
async def test_node_with_nano_batches_gives_the_greedy_tokens(tmp_path: Path) -> None:
    from greenroom.bus.messages import SamplingParams
    from greenroom.client import AsyncClient
    from greenroom.node import Node

    model_dir = save_checkpoint(transformers.LlamaConfig(**DIMS), tmp_path / "llama", seed=23)
    prompt_list = random_prompts((7, 19, 12, 30, 5), DIMS["vocab_size"], seed=4)
    cfg = load_config(
        overrides={
            "port": 0,
            "model.path": str(model_dir),
            "model.decode_nano_batches": True,
            "model.nano_batch_min_rows": 3,
            "kv.num_blocks": 128,
            "kv.tokens_per_block": TPB,
            "log_level": "warning",
        }
    )
    node = await Node.start(cfg)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            results = await asyncio.gather(*(client.generate(p, sampling) for p in prompt_list))
    finally:
        await node.stop()
    expected = transformers_greedy(model_dir, prompt_list, NEW_TOKENS)
    assert [r.token_ids for r in results] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention_stream", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_graphs_with_nano_batches_match_the_plain_path(
    dtype: str, attention_stream: bool, tmp_path
) -> None:
    config = transformers.LlamaConfig(
        **{**DIMS, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3}
    )
    model_dir = save_checkpoint(config, tmp_path / "llama", seed=5)
    cfg = ModelConfig(
        dtype=dtype,
        cuda_graph_max_batch_size=32,
        decode_nano_batches=True,
        nano_batch_min_rows=20,
        nano_batch_attention_stream=attention_stream,
    )
    runner = ModelRunner(cfg, KVConfig(tokens_per_block=16, num_blocks=600), model_dir, "cuda")
    assert runner.model.nano is not None
    stream = torch.cuda.Stream()
    sizes = runner.capture_cuda_graphs(stream, batch_sizes=[8, 16, 32])
    assert sizes == [8, 16, 32]
    tol = 1e-4 if dtype == "float32" else 2e-2
    gen = torch.Generator().manual_seed(0)
    for rows in (13, 27, 32):  # 13 rows: the plain 16-row graph; 27 and 32: split
        runner.kv_pool.copy_(torch.randn(runner.kv_pool.shape, generator=gen).to(runner.dtype))
        chunks = [
            SequenceChunk([3 + r], 30 + 7 * r, list(range(1 + 16 * r, 1 + 16 * (r + 1))))
            for r in range(rows)
        ]
        batch = runner.build_batch(chunks)
        assert runner.graphs is not None and runner.graphs.can_run(batch)
        pool = runner.kv_pool.clone()
        graph = runner.forward(batch).clone()
        graph_pool = runner.kv_pool.clone()
        runner.kv_pool.copy_(pool)
        eager = runner.forward(batch, graphs="none").clone()
        eager_pool = runner.kv_pool.clone()
        runner.kv_pool.copy_(pool)
        runner.model.nano, nano = None, runner.model.nano
        plain = runner.forward(batch, graphs="none")
        runner.model.nano = nano
        torch.cuda.synchronize()
        torch.testing.assert_close(eager, plain, atol=tol, rtol=tol)
        torch.testing.assert_close(graph, plain, atol=tol, rtol=tol)
        # the graph's padded rows write into the null block (0), which no row reads
        torch.testing.assert_close(graph_pool[1:], runner.kv_pool[1:], atol=tol, rtol=tol)
        torch.testing.assert_close(eager_pool, runner.kv_pool, atol=tol, rtol=tol)
