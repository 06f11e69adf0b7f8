"""Tensor parallelism on CPU ranks (gloo): greedy tokens at tp 2 and 4 equal tp 1 and
transformers, for checkpoints with fewer KV heads than ranks, a vocabulary no tp size
divides, tied embeddings, Qwen2 q/k/v biases and Llama's o_proj bias; with chunked prefill
and prefix reuse."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_checkpoint, transformers_greedy
from tp_ranks import NEW_TOKENS, make_runner, request_prompts, serve_greedy, serve_on_ranks

from greenroom.models import CheckpointError
from greenroom.models.arch import ArchConfig
from greenroom.parallel.shard import TPShard, check_tp_size

transformers = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

CHECKPOINTS = {
    # 2 KV heads: split at tp 2, replicated at tp 4; vocab 251 (prime); q/k/v and o biases
    "llama-bias-vocab251": lambda: transformers.LlamaConfig(
        **COMMON, vocab_size=251, num_key_value_heads=2, attention_bias=True
    ),
    # 1 KV head: replicated at every tp; vocab 253; tied embeddings; Qwen2 q/k/v biases
    "qwen2-kv1-tied": lambda: transformers.Qwen2Config(
        **COMMON, vocab_size=253, num_key_value_heads=1, tie_word_embeddings=True
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tp")
    return [
        save_checkpoint(make(), root / name, seed=zlib.crc32(name.encode()))
        for name, make in CHECKPOINTS.items()
    ]


@torch.no_grad()
def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(model_dir, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def single_rank(checkpoints) -> dict[Path, list[list[int]]]:
    out = {}
    for d in checkpoints:
        runner = make_runner(d)
        out[d] = serve_greedy(runner, request_prompts(runner.vocab_size))
    return out


def test_single_rank_matches_transformers(checkpoints, single_rank) -> None:
    for d in checkpoints:
        prompts = request_prompts(ArchConfig.from_dir(d).vocab_size)
        assert single_rank[d] == hf_greedy(d, prompts), d.name


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_match_a_single_rank(checkpoints, single_rank, tp) -> None:
    per_rank = serve_on_ranks(checkpoints, tp)
    for d in checkpoints:
        for rank, outputs in enumerate(per_rank):
            assert outputs[d] == single_rank[d], (d.name, tp, rank)


def test_helix_shard_keeps_every_head_and_splits_the_rest() -> None:
    arch = ArchConfig.from_dict(
        dict(
            architectures=["LlamaForCausalLM"],
            hidden_size=48,
            intermediate_size=36,
            num_hidden_layers=1,
            num_attention_heads=6,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    shard = TPShard.of(arch, 2, 3, helix=True)
    assert shard.q_slice(arch) == slice(0, arch.q_size)
    assert shard.kv_slice(arch) == slice(0, arch.kv_size)
    assert shard.o_slice(arch) == slice(4 * arch.head_dim, 6 * arch.head_dim)
    assert shard.intermediate_slice == slice(24, 36) and shard.vocab_slice == slice(68, 100)
    local = shard.local_arch(arch)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (6, 2, 12)
    with pytest.raises(CheckpointError, match="cp_size = 4 does not divide"):
        TPShard.of(arch, 0, 4, helix=True)


def test_helix_cp_x_tp_shards_heads_by_tp_then_o_proj_by_the_exchanged_slice() -> None:
    arch = ArchConfig.from_dict(
        dict(
            architectures=["LlamaForCausalLM"],
            hidden_size=96,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=100,
        )
    )
    d = arch.head_dim
    # cp 2 x tp 2: group rank c * 2 + t
    shards = [TPShard.of(arch, g, 4, helix=True, helix_tp=2) for g in range(4)]
    assert [s.q_slice(arch) for s in shards] == [slice(0, 6 * d), slice(6 * d, 12 * d)] * 2
    assert [(s.num_kv_heads, s.kv_head_start) for s in shards] == [(2, 0), (2, 2)] * 2
    # the all-to-all over CP hands CP rank c slice c of its TP rank's heads: head slice t*2+c
    o = [s.o_slice(arch) for s in shards]
    assert o == [slice(0, 3 * d), slice(6 * d, 9 * d), slice(3 * d, 6 * d), slice(9 * d, 12 * d)]
    assert [s.intermediate_slice for s in shards] == [slice(24 * g, 24 * g + 24) for g in range(4)]
    with pytest.raises(CheckpointError, match="cp_size \\* tp_size = 8 does not divide"):
        TPShard.of(arch, 0, 8, helix=True, helix_tp=2)


def test_shard_slices_cover_the_checkpoint() -> None:
    arch = ArchConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 251,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 1,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        }
    )
    shards = [TPShard.of(arch, r, 4) for r in range(4)]
    assert [s.kv_head_start for s in shards] == [0, 0, 1, 1]  # KV heads replicated in pairs
    assert [s.q_slice(arch) for s in shards] == [slice(16 * r, 16 * (r + 1)) for r in range(4)]
    vocab = [s.vocab_slice for s in shards]
    assert vocab[0].start == 0 and vocab[-1].stop == 251
    assert all(a.stop == b.start for a, b in zip(vocab, vocab[1:], strict=False))
    assert {s.vocab_per_rank for s in shards} == {63}


@pytest.mark.parametrize(
    ("heads", "kv", "inter", "tp", "match"),
    [
        (6, 2, 96, 4, "num_attention_heads"),
        (8, 3, 96, 2, "num_key_value_heads"),
        (8, 8, 90, 4, "intermediate_size"),
    ],
)
def test_unsplittable_shapes_are_refused(heads, kv, inter, tp, match) -> None:
    arch = ArchConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 96,
            "intermediate_size": inter,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": 16,
        }
    )
    with pytest.raises(CheckpointError, match=match):
        check_tp_size(arch, tp)
