"""Checkpoint loading: sharded indexes, rope parsing, and errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ArchConfig, CheckpointError, ModelRunner, SequenceChunk
from greenroom.models.kv_pool import bytes_per_block
from greenroom.models.rope import attention_factor, inverse_frequencies
from greenroom.models.tiny import TINY_CONFIG, tiny_llama_dir


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir(), target)
    return target


def load(path: Path, **kv) -> ModelRunner:
    return ModelRunner(ModelConfig(), KVConfig(num_blocks=8, **kv), path, "cpu")


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_is_named(ckpt: Path) -> None:
    edit_config(ckpt, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(CheckpointError, match="GPTNeoXForCausalLM.*not supported"):
        load(ckpt)


def test_unsupported_rope_type_is_named(ckpt: Path) -> None:
    edit_config(ckpt, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(CheckpointError, match="'longrope' is not supported"):
        load(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load(ckpt)


def test_shape_mismatch_is_named(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(8, 64\)"
    ):
        load(ckpt)


def test_missing_weights_file(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(ckpt)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


def test_sharded_checkpoint_loads_the_same_weights(ckpt: Path, tmp_path: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ckpt / "config.json", sharded / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / file)
        weight_map |= {n: file for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = [3, 9, 27, 81, 243]
    out = []
    for path in (ckpt, sharded):
        runner = load(path)
        batch = runner.build_batch([SequenceChunk(ids, 0, [1])])
        out.append(runner.forward(batch))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_missing_shard_is_named(ckpt: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00009-of-00009.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors"):
        load(ckpt)


def test_runner_reports_pool_and_model_facts(ckpt: Path) -> None:
    runner = ModelRunner(ModelConfig(), KVConfig(tokens_per_block=8, cpu_pool_tokens=100), ckpt)
    arch = ArchConfig.from_dict(TINY_CONFIG)
    assert runner.device.type in ("cpu", "cuda")
    assert runner.num_blocks == 14  # ceil(100 / 8) + the null block
    assert runner.kv_pool.shape == (14, 2, 2, 8, 2, 16)
    assert runner.kv_pool[0].numel() * 4 == bytes_per_block(arch, 8, torch.float32)
    assert runner.eos_token_ids == [2] and runner.max_model_len == 2048


def test_sliding_window_does_not_cap_max_model_len(ckpt: Path) -> None:
    edit_config(ckpt, architectures=["MistralForCausalLM"], sliding_window=512)
    runner = load(ckpt)
    assert runner.max_model_len == 2048 and runner.arch.layer_windows == (512, 512)


QWEN2 = dict(TINY_CONFIG, architectures=["Qwen2ForCausalLM"], num_hidden_layers=4)


@pytest.mark.parametrize(
    "changes,windows",
    [
        ({"sliding_window": 64}, ()),  # use_sliding_window false: no layer slides
        ({"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 4}, ()),
        (
            {"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1},
            (0, 64, 64, 64),
        ),
        (
            {
                "sliding_window": 64,
                "use_sliding_window": True,
                "max_window_layers": 0,  # layer_types wins over max_window_layers
                "layer_types": ["sliding_attention", "full_attention"] * 2,
            },
            (64, 0, 64, 0),
        ),
        ({"sliding_window": None, "use_sliding_window": True}, ()),
    ],
)
def test_qwen2_layer_windows_follow_transformers(changes: dict, windows: tuple) -> None:
    arch = ArchConfig.from_dict(dict(QWEN2, **changes))
    assert arch.layer_windows == windows
    assert [arch.window(i) for i in range(4)] == list(windows or (0, 0, 0, 0))
    assert arch.sliding_window == (64 if windows else None)


def test_llama_ignores_sliding_window_and_unknown_layer_types_are_named() -> None:
    assert ArchConfig.from_dict(dict(TINY_CONFIG, sliding_window=8)).layer_windows == ()
    bad = dict(QWEN2, sliding_window=8, use_sliding_window=True, layer_types=["chunked"] * 4)
    with pytest.raises(CheckpointError, match="layer_types.*not supported"):
        ArchConfig.from_dict(bad)


def test_generation_config_adds_eos_ids(ckpt: Path) -> None:
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load(ckpt).eos_token_ids == [2, 7]


def test_rope_parameters_and_legacy_rope_scaling_agree() -> None:
    legacy = dict(TINY_CONFIG, rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    modern = dict(
        TINY_CONFIG, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    )
    modern.pop("rope_theta")
    a, b = ArchConfig.from_dict(legacy), ArchConfig.from_dict(modern)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling == b.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    base = inverse_frequencies(16, 5e5, None)
    torch.testing.assert_close(inverse_frequencies(16, 5e5, a.rope_scaling), base / 4.0)


def test_llama3_rope_keeps_high_and_scales_low_frequencies() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = inverse_frequencies(128, 5e5, None)
    scaled = inverse_frequencies(128, 5e5, scaling)
    assert scaled[0] == base[0]  # shortest wavelength untouched
    torch.testing.assert_close(scaled[-1], base[-1] / 8.0)  # longest divided by the factor
    assert ((scaled <= base) & (scaled >= base / 8.0)).all()


@pytest.mark.parametrize(
    "extra",
    [{}, {"beta_fast": 16, "beta_slow": 2}, {"truncate": False}, {"attention_factor": 0.9}],
)
def test_yarn_rope_matches_transformers(extra: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    scaling |= extra
    hf = transformers.Qwen3Config(
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=1e6,
        rope_scaling=scaling,
        architectures=["Qwen3ForCausalLM"],
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    arch = ArchConfig.from_dict(hf.to_dict())
    assert arch.rope_theta == 1e6 and arch.rope_scaling["rope_type"] == "yarn"
    torch.testing.assert_close(inverse_frequencies(128, 1e6, arch.rope_scaling), inv_freq)
    assert attention_factor(arch.rope_scaling) == pytest.approx(factor)


def test_yarn_factor_and_original_length_default_as_transformers() -> None:
    cfg = dict(TINY_CONFIG, max_position_embeddings=4096, rope_scaling={"rope_type": "yarn"})
    scaling = ArchConfig.from_dict(cfg).rope_scaling
    assert scaling["original_max_position_embeddings"] == 4096 and scaling["factor"] == 1.0
    assert attention_factor(scaling) == 1.0


def test_qwen3_reads_its_head_dim_qk_norms_and_attention_bias(ckpt: Path) -> None:
    cfg = dict(
        TINY_CONFIG,
        architectures=["Qwen3ForCausalLM"],
        head_dim=24,
        attention_bias=True,
        sliding_window=4096,
        use_sliding_window=False,
    )
    arch = ArchConfig.from_dict(cfg)
    assert (arch.head_dim, arch.qk_norm, arch.qkv_bias, arch.o_bias) == (24, True, True, True)
    assert arch.sliding_window is None  # Qwen3 ships sliding_window with use_sliding_window false
    edit_config(ckpt, architectures=["Qwen3ForCausalLM"])
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.q_norm"):
        load(ckpt)


def test_readme_names_every_supported_architecture_and_rope_type() -> None:
    from greenroom.models.arch import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in (*SUPPORTED_ARCHITECTURES, *SUPPORTED_ROPE_TYPES):
        assert f"`{name}`" in readme, name
