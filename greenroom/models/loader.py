"""Load Llama-family weights from a Hugging Face checkpoint directory (never from a hub).

Tensors are read through safetensors' memory map (one file, or shards listed in
``model.safetensors.index.json``), checked against the shapes ``config.json`` implies,
cast and moved to the device. q/k/v and gate/up are fused into one matrix each. A
tensor-parallel rank reads only its slices (``get_slice``): no full tensor is ever in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from greenroom.models.arch import ArchConfig, CheckpointError

if TYPE_CHECKING:
    from greenroom.parallel.shard import TPShard
    from greenroom.parallel.stages import PipelineStage


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
    """A pipeline stage holds its layers only: the embedding on the first stage, the final
    norm and LM head on the last (None elsewhere)."""

    embed: torch.Tensor | None
    layers: list[LayerWeights]
    norm: torch.Tensor | None
    lm_head: torch.Tensor | None  # the embedding itself when tied


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
        return {name: _shard_path(model_dir, shard) for name, shard in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise CheckpointError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
    )


def _shard_path(model_dir: Path, shard: object) -> Path:
    """A shard named by the index: a file inside the model directory, nothing else."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(
            f"{model_dir}: the index names a shard {shard!r} that is not a file name"
        )
    path = model_dir / shard
    root = model_dir.resolve()
    if Path(shard).is_absolute() or not path.resolve().is_relative_to(root):
        raise CheckpointError(
            f"{model_dir}: the index names shard {shard!r}, outside the model directory; refused"
        )
    return path


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

    def get(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """The tensor, or only its ``rows`` (dim 0) or ``cols`` (dim 1) slice."""
        path = self.files.get(name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: checkpoint is missing tensor {name!r}")
        if path not in self._handles:
            raise CheckpointError(f"{self.model_dir}: shard {path.name!r} for {name!r} is missing")
        part = self._handles[path].get_slice(name)
        expected = self.shapes[name]
        if tuple(part.get_shape()) != expected:
            raise CheckpointError(
                f"{self.model_dir}: tensor {name!r} has shape {tuple(part.get_shape())}, "
                f"config.json implies {expected}"
            )
        if rows is not None:
            tensor = part[rows]
        elif cols is not None:
            tensor = part[:, cols]
        else:
            tensor = part[:]
        return tensor.to(device=device, dtype=dtype)


def _layers(
    ckpt: _Checkpoint,
    arch: ArchConfig,
    dtype,
    device,
    shard: TPShard | None = None,
    layers: range | None = None,
) -> Iterator[LayerWeights]:
    """Each layer's weights; with ``shard``, the rank's slices: q/k/v and gate/up by rows,
    o and down by columns, the o bias on rank 0 only (added once by the all-reduce)."""
    q_rows = kv_rows = inter = o_cols = None
    if shard is not None:
        q_rows, kv_rows, inter = shard.q_slice(arch), shard.kv_slice(arch), shard.intermediate_slice
        o_cols = shard.o_slice(arch)
    for i in layers if layers is not None else range(arch.num_layers):
        p = f"model.layers.{i}."

        def get(name: str, p: str = p, **part) -> torch.Tensor:
            return ckpt.get(p + name, dtype, device, **part)

        def qkv(suffix: str) -> torch.Tensor:
            return torch.cat(
                [
                    get("self_attn.q_proj" + suffix, rows=q_rows),
                    get("self_attn.k_proj" + suffix, rows=kv_rows),
                    get("self_attn.v_proj" + suffix, rows=kv_rows),
                ]
            )

        yield LayerWeights(
            input_norm=get("input_layernorm.weight"),
            qkv=qkv(".weight"),
            qkv_bias=qkv(".bias") if arch.qkv_bias else None,
            o=get("self_attn.o_proj.weight", cols=o_cols),
            o_bias=get("self_attn.o_proj.bias")
            if arch.o_bias and (shard is None or shard.rank == 0)
            else None,
            post_norm=get("post_attention_layernorm.weight"),
            gate_up=torch.cat(
                [get("mlp.gate_proj.weight", rows=inter), get("mlp.up_proj.weight", rows=inter)]
            ),
            down=get("mlp.down_proj.weight", cols=inter),
            q_norm=get("self_attn.q_norm.weight") if arch.qk_norm else None,
            k_norm=get("self_attn.k_norm.weight") if arch.qk_norm else None,
        )


def _vocab_rows(ckpt: _Checkpoint, name: str, dtype, device, shard: TPShard | None) -> torch.Tensor:
    """The embedding or LM head; with ``shard``, its vocabulary rows padded with zeros."""
    if shard is None:
        return ckpt.get(name, dtype, device)
    part = ckpt.get(name, dtype, device, rows=shard.vocab_slice)
    pad = shard.vocab_per_rank - part.shape[0]
    if pad:
        part = torch.cat([part, part.new_zeros(pad, part.shape[1])])
    return part


def load_weights(
    model_dir: str | Path,
    arch: ArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    shard: TPShard | None = None,
    stage: PipelineStage | None = None,
) -> ModelWeights:
    """Read, check and place every weight of ``arch`` (a rank's slices with ``shard``, a
    pipeline stage's layers with ``stage``)."""
    model_dir = Path(model_dir)
    with ExitStack() as stack:
        ckpt = _Checkpoint(model_dir, arch, stack)
        return _assemble(ckpt, arch, dtype, device, shard, stage)


def _assemble(source, arch: ArchConfig, dtype, device, shard, stage) -> ModelWeights:
    first = stage is None or stage.is_first
    last = stage is None or stage.is_last
    embed = lm_head = norm = None
    if first or (last and arch.tie_word_embeddings):
        embed = _vocab_rows(source, "model.embed_tokens.weight", dtype, device, shard)
    layers = list(_layers(source, arch, dtype, device, shard, stage.layers if stage else None))
    if last:
        norm = source.get("model.norm.weight", dtype, device)
        lm_head = (
            embed
            if arch.tie_word_embeddings
            else _vocab_rows(source, "lm_head.weight", dtype, device, shard)
        )
    return ModelWeights(embed=embed if first else None, layers=layers, norm=norm, lm_head=lm_head)


def random_weights(
    arch: ArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    std: float = 0.02,
    shard: TPShard | None = None,
    stage: PipelineStage | None = None,
) -> ModelWeights:
    """Random weights of the right shapes (a rank's slice shapes with ``shard``), made
    directly on ``device`` (benchmarks)."""
    gen = torch.Generator(device=device).manual_seed(seed + (shard.rank if shard else 0))
    shapes = expected_shapes(arch)

    class _Random:
        def get(self, name: str, dtype_, device_, rows=None, cols=None) -> torch.Tensor:
            shape = list(shapes[name])
            if rows is not None:
                shape[0] = len(range(*rows.indices(shape[0])))
            if cols is not None:
                shape[1] = len(range(*cols.indices(shape[1])))
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=dtype, device=device)
            t = torch.empty(shape, dtype=dtype, device=device)
            return t.normal_(0.0, std, generator=gen)

    return _assemble(_Random(), arch, dtype, device, shard, stage)
