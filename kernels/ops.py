"""Kernel dispatch: a Triton implementation on CUDA when one is registered, else the reference.

Triton kernels live in ``greenroom/kernels/triton_*.py`` and define functions with the same
names and signatures as :mod:`greenroom.kernels.reference`. They are found on the first
CUDA call (every ``triton_*`` module is imported and each function named like a kernel is
registered) or registered explicitly with :func:`register`. CPU tensors always take the
reference path, so the whole system runs without a GPU.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Literal

import torch

from greenroom.kernels import reference

KERNELS = (
    "write_kv_cache",
    "paged_decode_attention",
    "paged_decode_attention_partial",
    "paged_prefill_attention",
    "merge_attn_states",
    "fused_add_rms_norm",
    "rms_norm",
    "apply_rotary",
    "rotary_write_kv",
    "silu_and_mul",
)

Backend = Literal["auto", "reference"]

_triton: dict[str, Callable] = {}
_discovered = False
_backend: Backend = "auto"


def register(name: str, fn: Callable) -> None:
    """Use ``fn`` for kernel ``name`` on CUDA tensors."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels are {', '.join(KERNELS)}")
    _triton[name] = fn


def set_backend(backend: Backend) -> None:
    """``"auto"``: Triton on CUDA where registered; ``"reference"``: torch everywhere."""
    global _backend
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend {backend!r} is invalid: must be 'auto' or 'reference'")
    _backend = backend


def _discover() -> None:
    global _discovered
    _discovered = True
    package = importlib.import_module("greenroom.kernels")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("triton_"):
            continue
        try:
            module = importlib.import_module(f"greenroom.kernels.{info.name}")
        except ImportError:  # triton missing on this machine: stay on the references
            continue
        for name in KERNELS:
            fn = getattr(module, name, None)
            if callable(fn) and name not in _triton:
                _triton[name] = fn


def implementation(name: str, device: torch.device) -> Callable:
    """The function that runs kernel ``name`` for tensors on ``device``."""
    if device.type == "cuda" and _backend == "auto":
        if not _discovered:
            _discover()
        fn = _triton.get(name)
        if fn is not None:
            return fn
    return getattr(reference, name)


def active_backends(device: torch.device) -> dict[str, str]:
    """Kernel name -> ``"triton"`` or ``"reference"`` for ``device`` (for logs and benchmarks)."""
    return {
        name: "reference" if implementation(name, device) is getattr(reference, name) else "triton"
        for name in KERNELS
    }


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    implementation("write_kv_cache", k.device)(k, v, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    scale,
    num_splits: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """``window > 0``: sliding-window attention over the last ``window`` tokens (only their
    blocks are read)."""
    return implementation("paged_decode_attention", q.device)(
        q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, window=window
    )


def paged_decode_attention_partial(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    scale,
    num_splits: int | None = None,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("paged_decode_attention_partial", q.device)(
        q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, window=window
    )


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    context_lens,
    scale,
    max_seqlen_q,
    tiles=None,
    window: int = 0,
) -> torch.Tensor:
    """``tiles``: a fixed-length work list (:mod:`greenroom.kernels.prefill_tiles`) for a
    launch shape that does not follow the batch (CUDA graphs); the result is the same.
    ``window > 0``: the query at position ``p`` sees keys ``p - window < t <= p`` only."""
    fn = implementation("paged_prefill_attention", q.device)
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_seqlen_q)
    return fn(*args, tiles=tiles, window=window)


def merge_attn_states(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("merge_attn_states", outs.device)(outs, lses)


def fused_add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("fused_add_rms_norm", x.device)(x, residual, weight, eps)


def rms_norm(x, weight, eps) -> torch.Tensor:
    return implementation("rms_norm", x.device)(x, weight, eps)


def silu_and_mul(x) -> torch.Tensor:
    return implementation("silu_and_mul", x.device)(x)


def apply_rotary(q, k, positions, cos_sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("apply_rotary", q.device)(q, k, positions, cos_sin_cache)


def rotary_write_kv(
    q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
) -> torch.Tensor:
    """``apply_rotary`` and ``write_kv_cache`` in one pass (rotary over the whole head
    dimension): rotated k and v go to their slots, the rotated q is returned."""
    fn = implementation("rotary_write_kv", q.device)
    return fn(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


__all__ = [
    "KERNELS",
    "active_backends",
    "apply_rotary",
    "fused_add_rms_norm",
    "implementation",
    "merge_attn_states",
    "paged_decode_attention",
    "paged_decode_attention_partial",
    "paged_prefill_attention",
    "register",
    "rms_norm",
    "rotary_write_kv",
    "set_backend",
    "silu_and_mul",
    "write_kv_cache",
]
