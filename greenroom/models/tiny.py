"""The embedded tiny random-weight Llama, so a fresh machine can run the whole pipeline.

Built from a fixed seed without transformers, written once as a normal Hugging Face
checkpoint directory (``config.json`` + ``model.safetensors``) and then loaded through the
ordinary loader, so tests can compare serving output with transformers on the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from greenroom.models.arch import ArchConfig
from greenroom.models.loader import expected_shapes

TINY_VERSION = 1
TINY_SEED = 1234

TINY_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "greenroom"


def tiny_weights(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for :data:`TINY_CONFIG` (norms random around 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(ArchConfig.from_dict(TINY_CONFIG)).items():
        noise = torch.randn(shape, generator=gen)
        tensors[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise
    return tensors


def tiny_llama_dir(root: str | Path | None = None) -> Path:
    """The tiny checkpoint's directory, written on first use (atomically, so concurrent
    callers never see a half-written checkpoint)."""
    target = Path(root or _cache_root()) / f"tiny-llama-v{TINY_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
        save_file(tiny_weights(), str(staging / "model.safetensors"), metadata={"format": "pt"})
        try:
            staging.rename(target)
        except OSError:  # another process won the race
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
