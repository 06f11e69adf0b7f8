"""Rotary embedding tables, with the ``linear``, ``llama3`` and ``yarn`` frequency scalings."""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies, scaled as Hugging Face does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_frequencies(inv_freq, head_dim, theta, factor, scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported")


def _yarn_frequencies(
    inv_freq: torch.Tensor, head_dim: int, theta: float, factor: float, scaling: dict[str, Any]
) -> torch.Tensor:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the pretraining length
    are interpolated by ``factor``, those turning more than ``beta_fast`` times are kept, with
    a linear ramp between (the correction range rounded outwards unless ``truncate`` is false)."""
    original = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN scales cos and sin by (1 for every other kind)."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(float(m)) / mscale(float(m_all)) if m and m_all else mscale(1.0)


def cos_sin_cache(
    head_dim: int,
    max_position: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[max_position, head_dim]`` float32: cos of the half-dim angles, then sin (both times
    YaRN's attention factor)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    angles = torch.outer(positions, inv_freq)
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)
    factor = attention_factor(scaling)
    return (table * factor if factor != 1.0 else table).to(device)
