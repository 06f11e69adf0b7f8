"""Load Llama-family weights from a Hugging Face checkpoint directory (never from a hub).

Tensors are read through safetensors' memory map (one file, or shards listed in
``model.safetensors.index.json``), checked against the shapes ``config.json`` implies,
cast and moved to the device. q/k/v and gate/up are fused into one matrix each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from greenroom.models.arch import ArchConfig, CheckpointError


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    q_norm: torch.Tensor | None = None  # [head_dim], per-head RMSNorm weights (Qwen3)
    k_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied


def expected_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for every tensor the decoder reads."""
    h, inter = arch.hidden_size, arch.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.q_size, h),
            p + "self_attn.k_proj.weight": (arch.kv_size, h),
            p + "self_attn.v_proj.weight": (arch.kv_size, h),
            p + "self_attn.o_proj.weight": (h, arch.q_size),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if arch.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (arch.q_size,),
                p + "self_attn.k_proj.bias": (arch.kv_size,),
                p + "self_attn.v_proj.bias": (arch.kv_size,),
            }
        if arch.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (arch.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (arch.head_dim,)
    return shapes


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise CheckpointError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
    )


class _Checkpoint:
    """Memory-mapped access to every tensor of a checkpoint, with shape checks."""

    def __init__(self, model_dir: Path, arch: ArchConfig, stack: ExitStack) -> None:
        self.model_dir = model_dir
        self.files = _weight_files(model_dir)
        self.shapes = expected_shapes(arch)
        self._handles = {
            path: stack.enter_context(safe_open(path, framework="pt"))
            for path in sorted(set(self.files.values()))
            if path.is_file()
        }

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: checkpoint is missing tensor {name!r}")
        if path not in self._handles:
            raise CheckpointError(f"{self.model_dir}: shard {path.name!r} for {name!r} is missing")
        tensor = self._handles[path].get_tensor(name)
        expected = self.shapes[name]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"config.json implies {expected}"
            )
        return tensor.to(device=device, dtype=dtype)


def _layers(ckpt: _Checkpoint, arch: ArchConfig, dtype, device) -> Iterator[LayerWeights]:
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."

        def get(name: str, p: str = p) -> torch.Tensor:
            return ckpt.get(p + name, dtype, device)

        qkv_names = [f"self_attn.{x}_proj" for x in "qkv"]
        yield LayerWeights(
            input_norm=get("input_layernorm.weight"),
            qkv=torch.cat([get(n + ".weight") for n in qkv_names]),
            qkv_bias=torch.cat([get(n + ".bias") for n in qkv_names]) if arch.qkv_bias else None,
            o=get("self_attn.o_proj.weight"),
            o_bias=get("self_attn.o_proj.bias") if arch.o_bias else None,
            post_norm=get("post_attention_layernorm.weight"),
            gate_up=torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]),
            down=get("mlp.down_proj.weight"),
            q_norm=get("self_attn.q_norm.weight") if arch.qk_norm else None,
            k_norm=get("self_attn.k_norm.weight") if arch.qk_norm else None,
        )


def load_weights(
    model_dir: str | Path, arch: ArchConfig, dtype: torch.dtype, device: torch.device
) -> ModelWeights:
    """Read, check and place every weight of ``arch`` from ``model_dir``."""
    model_dir = Path(model_dir)
    with ExitStack() as stack:
        ckpt = _Checkpoint(model_dir, arch, stack)
        embed = ckpt.get("model.embed_tokens.weight", dtype, device)
        layers = list(_layers(ckpt, arch, dtype, device))
        norm = ckpt.get("model.norm.weight", dtype, device)
        lm_head = embed if arch.tie_word_embeddings else ckpt.get("lm_head.weight", dtype, device)
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def random_weights(
    arch: ArchConfig, dtype: torch.dtype, device: torch.device, seed: int = 0, std: float = 0.02
) -> ModelWeights:
    """Random weights of the right shapes, made directly on ``device`` (benchmarks)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(arch)

    def make(name: str) -> torch.Tensor:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.normal_(0.0, std, generator=gen)

    class _Random:
        def get(self, name: str, dtype_: torch.dtype, device_: torch.device) -> torch.Tensor:
            return make(name)

    source = _Random()
    embed = make("model.embed_tokens.weight")
    layers = list(_layers(source, arch, dtype, device))  # type: ignore[arg-type]
    lm_head = embed if arch.tie_word_embeddings else make("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, norm=make("model.norm.weight"), lm_head=lm_head)
