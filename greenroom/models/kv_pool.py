"""The paged KV pool: one block-major tensor, sized from free device memory.

Layout ``[num_blocks, num_layers, 2, tokens_per_block, num_kv_heads, head_dim]``: one block
(all layers, K and V) is contiguous, so host-tier copies and KV transfer move whole blocks
with one copy. Block 0 is the null block: the KV manager never hands it out, and padded
batch rows (CUDA graphs) point at it.
"""

from __future__ import annotations

import torch

from greenroom.config import KVConfig
from greenroom.models.arch import ArchConfig

NULL_BLOCK = 0


def bytes_per_block(arch: ArchConfig, tokens_per_block: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * tokens_per_block * arch.num_kv_heads * arch.head_dim * elem


def activation_reserve_bytes(arch: ArchConfig, dtype: torch.dtype, num_tokens: int = 8192) -> int:
    """Headroom for one forward of ``num_tokens`` tokens: the widest live activations
    (fused gate/up, QKV, a few hidden-sized buffers, float32 attention temporaries) plus
    logits for 256 rows, doubled for allocator fragmentation."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (
        3 * arch.intermediate_size
        + arch.q_size
        + 2 * arch.kv_size
        + 6 * arch.hidden_size
        + 4 * arch.q_size  # float32 attention output and its cast
    ) * elem
    logits = 256 * arch.vocab_size * 4 * 2
    return 2 * (num_tokens * per_token + logits)


def plan_num_blocks(
    kv_cfg: KVConfig, arch: ArchConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks to allocate (the null block included): ``kv_cfg.num_blocks`` if set; on CPU
    enough for ``cpu_pool_tokens``; on CUDA what fits in ``gpu_memory_utilization`` of the
    device's memory after what is already in use (weights) and the activation headroom."""
    if kv_cfg.num_blocks:
        return max(kv_cfg.num_blocks, 2)
    tpb = kv_cfg.tokens_per_block
    if device.type != "cuda":
        return -(-kv_cfg.cpu_pool_tokens // tpb) + 1
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(total * kv_cfg.gpu_memory_utilization) - used
    budget -= activation_reserve_bytes(arch, dtype)
    blocks = budget // bytes_per_block(arch, tpb, dtype)
    if blocks < 2:
        raise MemoryError(
            f"no room for a KV pool: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
            f"gpu_memory_utilization = {kv_cfg.gpu_memory_utilization}; lower the model size "
            "or raise kv.gpu_memory_utilization"
        )
    return int(blocks)


def allocate_kv_pool(
    num_blocks: int,
    arch: ArchConfig,
    tokens_per_block: int,
    dtype: torch.dtype,
    device: torch.device,
    pin_memory: bool = False,
) -> torch.Tensor:
    shape = (num_blocks, arch.num_layers, 2, tokens_per_block, arch.num_kv_heads, arch.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
