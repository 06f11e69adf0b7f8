"""Random-weight presets serve real shapes with no checkpoint on disk."""

from __future__ import annotations

import pytest

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
