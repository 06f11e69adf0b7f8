"""The architecture of a checkpoint, read from its Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint this runtime cannot serve; the message names the file and the problem."""


# architecture name -> (bias on q/k/v, bias on o)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, False),
}
# architectures whose ``attention_bias`` puts a bias on q/k/v and o alike
_ATTENTION_BIAS_FLAG = ("LlamaForCausalLM", "Qwen3ForCausalLM")
# architectures with a per-head RMSNorm on q and k before rotary
_QK_NORM = ("Qwen3ForCausalLM",)
# architectures whose ``sliding_window`` applies only with ``use_sliding_window``, and then to
# the layers ``layer_types`` (or ``max_window_layers``) name
_WINDOW_FLAG = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
_LAYER_TYPES = ("full_attention", "sliding_attention")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ArchConfig:
    """Everything the decoder needs from ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None  # None or a dict with "rope_type"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None  # the window of the layers that slide; None: none does
    layer_windows: tuple[int, ...] = ()  # per layer: its window, 0 for full attention
    qk_norm: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def window(self, layer: int) -> int:
        """Layer ``layer``'s sliding window (its query at p sees keys p - window < t <= p);
        0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype, torch.float32)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{source}: architecture {archs or '<none>'} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            qkv_bias, o_bias = SUPPORTED_ARCHITECTURES[arch]
            if arch in _ATTENTION_BIAS_FLAG and cfg.get("attention_bias"):
                qkv_bias = o_bias = True
            if cfg.get("mlp_bias"):
                raise CheckpointError(f"{source}: mlp_bias = true is not supported")
            rope_theta, rope_scaling = _rope(cfg, source)
            num_layers = int(cfg["num_hidden_layers"])
            windows = _layer_windows(cfg, arch, num_layers, source)
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                sliding_window=max(windows) if windows else None,
                layer_windows=windows,
                qk_norm=arch in _QK_NORM,
                eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: required field {exc.args[0]!r} is missing") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ArchConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{model_dir}: no config.json (expected a Hugging Face checkpoint)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object at the top level")
        arch = cls.from_dict(data, source=str(path))
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            extra = _eos_ids(json.loads(gen.read_text()).get("eos_token_id"))
            eos = arch.eos_token_ids + [t for t in extra if t not in arch.eos_token_ids]
            arch = replace(arch, eos_token_ids=eos)
        return arch


def _layer_windows(cfg: dict[str, Any], arch: str, num_layers: int, source: str) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), as transformers reads them: Mistral
    slides every layer; Qwen2/Qwen3 only with ``use_sliding_window``, the layers ``layer_types``
    marks ``sliding_attention`` (without it, those from ``max_window_layers`` on); Llama
    ignores ``sliding_window``. Empty when no layer slides."""
    window = int(cfg.get("sliding_window") or 0)
    if arch == "MistralForCausalLM":
        return (window,) * num_layers if window > 0 else ()
    if arch not in _WINDOW_FLAG or not cfg.get("use_sliding_window") or window <= 0:
        return ()
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", 28))
        types = [_LAYER_TYPES[i >= first] for i in range(num_layers)]
    if len(types) != num_layers or any(t not in _LAYER_TYPES for t in types):
        raise CheckpointError(
            f"{source}: layer_types {types} is not supported: need {num_layers} entries, "
            f"each one of {', '.join(_LAYER_TYPES)}"
        )
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (older checkpoints)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):  # as transformers: the pretraining length by default
        merged.setdefault(
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)
        )
    if rope_type == "yarn" and merged.get("factor") is None:
        merged["factor"] = cfg.get("max_position_embeddings", 2048) / float(
            merged["original_max_position_embeddings"]
        )
    return theta, {"rope_type": rope_type, **merged}
