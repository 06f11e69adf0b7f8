"""Random-weight presets serve real shapes with no checkpoint on disk."""

from __future__ import annotations

import pytest
import torch

from greenroom.config import load_config
from greenroom.models.presets import PRESETS, is_preset
from greenroom.models.runner import ModelRunner


def test_small_preset_runs_a_forward() -> None:
    cfg = load_config(overrides={"model.path": "random:small", "kv.num_blocks": 32})
    runner = ModelRunner(cfg.model, cfg.kv)
    assert runner.vocab_size == PRESETS["small"]["vocab_size"]
    assert runner.model_name == "random:small"
    batch = runner.build_batch([_chunk([1, 2, 3], runner)])
    logits = runner.forward(batch)
    assert logits.shape == (1, runner.vocab_size)


def test_qwen3_and_mistral_presets_read_as_their_checkpoints() -> None:
    from greenroom.models.arch import ArchConfig

    qwen3 = ArchConfig.from_dict(PRESETS["qwen3-8b"])
    assert qwen3.qk_norm and qwen3.head_dim == 128 and qwen3.layer_windows == ()
    mistral = ArchConfig.from_dict(PRESETS["mistral-7b"])
    assert mistral.layer_windows == (4096,) * 32 and mistral.max_position_embeddings == 32768


def test_unknown_preset_names_the_known_ones() -> None:
    cfg = load_config(overrides={"model.path": "random:nope"})
    with pytest.raises(ValueError, match="random:llama-3.1-8b"):
        ModelRunner(cfg.model, cfg.kv)
    assert is_preset("random:small") and not is_preset("/models/llama") and not is_preset(None)


def _chunk(tokens, runner):
    from greenroom.models.batch import SequenceChunk

    return SequenceChunk(token_ids=tokens, num_cached=0, block_ids=[1])


def test_llama_2_70b_half_has_the_published_per_layer_shapes() -> None:
    from greenroom.models.arch import ArchConfig

    a = ArchConfig.from_dict(PRESETS["llama-2-70b-half"])
    assert (a.hidden_size, a.intermediate_size, a.num_layers) == (8192, 28672, 40)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (64, 8, 128, 32000)
    assert a.dtype == torch.bfloat16 and a.max_position_embeddings >= 10_600  # long_context
    per_layer = a.hidden_size * (a.q_size + 2 * a.kv_size) + a.q_size * a.hidden_size
    per_layer += 3 * a.hidden_size * a.intermediate_size
    weights = 2 * (a.num_layers * per_layer + 2 * a.vocab_size * a.hidden_size)
    assert 68e9 < weights < 71e9  # bf16 bytes: half of Llama-2-70B, fits one H200
