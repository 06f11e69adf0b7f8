"""Physical limits of a serving run: the device's measured copy bandwidth and matmul rate, and
the least time a set of requests needs on them.

The roofline of a run is prefill FLOPs at the matmul rate plus, for decode, every step's
weight read and every decoded token's KV read at the copy bandwidth. The fewest decode steps
is the longest output (less its first token, which the prefill samples), or the decode
tokens over the largest batch, whichever is more. Nothing here overlaps prefill with decode,
so a server that hides prefill inside memory-bound decode steps could beat it slightly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from greenroom.bench.timing import median_seconds
from greenroom.models.arch import ArchConfig


@dataclass(frozen=True)
class DeviceCeilings:
    copy_bytes_per_s: float  # a device copy, bytes read + bytes written
    matmul_flops_per_s: float  # a square matmul in the serving dtype

    def to_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(device: torch.device, nbytes: int, timed: Callable | None = None) -> float:
    """Bytes per second of a device copy, counting bytes read plus bytes written."""
    timed = timed or (lambda fn, reps, warmup: median_seconds(fn, device, reps, warmup))
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10, 3)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, timed: Callable | None = None):
    """FLOP/s of an ``n x n`` by ``n x n`` matmul on random data."""
    timed = timed or (lambda fn, reps, warmup: median_seconds(fn, device, reps, warmup))
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(lambda: a @ b, 10, 3)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> DeviceCeilings:
    """Both ceilings on ``device`` (2 GiB copy and 8192-square matmul on a GPU; small on CPU)."""
    cuda = device.type == "cuda"
    bandwidth = copy_bandwidth(device, 2 << 30 if cuda else 64 << 20)
    rate = matmul_rate(device, dtype, 8192 if cuda else 512)
    if cuda:
        torch.cuda.empty_cache()
    return DeviceCeilings(bandwidth, rate)


def weight_bytes(arch: ArchConfig, dtype: torch.dtype) -> int:
    """Bytes of every weight a decode step reads (embedding rows aside: the LM head's matrix
    counts once more unless tied)."""
    h, inter = arch.hidden_size, arch.intermediate_size
    per_layer = (
        h * (arch.q_size + 2 * arch.kv_size)  # qkv
        + arch.q_size * h  # o
        + 2 * h * inter  # gate_up
        + inter * h  # down
        + 2 * h  # norms
    )
    if arch.qkv_bias:
        per_layer += arch.q_size + 2 * arch.kv_size
    if arch.o_bias:
        per_layer += h
    total = arch.num_layers * per_layer + arch.vocab_size * h + h
    if not arch.tie_word_embeddings:
        total += arch.vocab_size * h
    return total * torch.finfo(dtype).bits // 8


def kv_bytes_per_token(arch: ArchConfig, dtype: torch.dtype) -> int:
    return arch.num_layers * 2 * arch.kv_size * torch.finfo(dtype).bits // 8


def prefill_flops(arch: ArchConfig, tokens: int) -> float:
    """Matmul FLOPs of one causal prefill of ``tokens`` with no cached prefix (LM head: the
    last token only)."""
    h, layers = arch.hidden_size, arch.num_layers
    per_token = (
        2 * layers * h * (arch.q_size + 2 * arch.kv_size + arch.q_size + 3 * arch.intermediate_size)
    )
    attention = layers * 2 * tokens * tokens * arch.num_heads * arch.head_dim  # QK^T + PV, causal
    return per_token * tokens + attention + 2 * h * arch.vocab_size


@dataclass(frozen=True)
class ServingRoofline:
    prefill_s: float
    decode_s: float
    decode_steps: int
    output_tokens: int
    # A tighter bound for engines that run a decode step's attention and its matmuls one after
    # the other: the KV read at the copy bandwidth plus the larger of the weight reads and the
    # decode matmul FLOPs at the matmul rate (at large batches decode matmuls are compute-bound).
    decode_serial_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def serial_seconds(self) -> float:
        return self.prefill_s + max(self.decode_serial_s, self.decode_s)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "seconds": self.seconds,
            "output_tokens_per_s": self.output_tokens_per_s,
            "serial_seconds": self.serial_seconds,
        }


def serving_roofline(
    lengths: Sequence[tuple[int, int]],
    max_batch: int,
    arch: ArchConfig,
    dtype: torch.dtype,
    ceilings: DeviceCeilings,
) -> ServingRoofline:
    """The least time for requests of (prompt, output) ``lengths``, all present from the
    start, decoded at most ``max_batch`` at a time."""
    prefill = sum(prefill_flops(arch, p) for p, _ in lengths) / ceilings.matmul_flops_per_s
    decode_rows = sum(o - 1 for _, o in lengths)
    # token t (1-based, after the first) of a request reads the KV of p + t - 1 positions
    # and writes its own: p + t tokens of KV traffic
    kv_tokens = sum((o - 1) * p + (o - 1) * o // 2 for p, o in lengths)
    longest = max((o - 1 for _, o in lengths), default=0)
    steps = max(longest, math.ceil(decode_rows / max_batch))
    bandwidth = ceilings.copy_bytes_per_s
    weights_s = steps * weight_bytes(arch, dtype) / bandwidth
    kv_s = kv_tokens * kv_bytes_per_token(arch, dtype) / bandwidth
    matmul_s = decode_rows * prefill_flops(arch, 1) / ceilings.matmul_flops_per_s
    return ServingRoofline(
        prefill_s=prefill,
        decode_s=weights_s + kv_s,
        decode_steps=steps,
        output_tokens=sum(o for _, o in lengths),
        decode_serial_s=kv_s + max(weights_s, matmul_s),
    )


__all__ = [
    "DeviceCeilings",
    "ServingRoofline",
    "copy_bandwidth",
    "kv_bytes_per_token",
    "matmul_rate",
    "measure_ceilings",
    "prefill_flops",
    "serving_roofline",
    "weight_bytes",
]
