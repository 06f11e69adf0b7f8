"""Random inputs for kernel tests: a NaN-poisoned paged KV pool with random block tables.

Only the slots of valid tokens hold data; every other slot is NaN, so a kernel that reads
past a context or through a wrong block shows NaN. References run on `clean(...)` copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    pool: torch.Tensor  # [num_blocks, num_layers, 2, page, Hkv, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with the null block 0
    context_lens: torch.Tensor  # [B] int32

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V caches with NaN replaced by 0, for the references."""
        return self.k_cache.nan_to_num(0.0), self.v_cache.nan_to_num(0.0)


def make_paged_kv(
    context_lens: list[int],
    page: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
    extra_blocks: int = 3,
    num_layers: int = 2,
    layer: int = 1,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """A pool in the engine's layout holding random K/V for `context_lens` tokens per request."""
    blocks_per_req = [-(-n // page) for n in context_lens]
    num_blocks = 1 + sum(blocks_per_req) + extra_blocks
    shape = (num_blocks, num_layers, 2, page, num_kv_heads, head_dim)
    pool = torch.full(shape, float("nan"), dtype=dtype, device=device)
    k_cache, v_cache = pool[:, layer, 0], pool[:, layer, 1]
    order = torch.randperm(num_blocks - 1, generator=generator) + 1
    max_blocks = max(max(blocks_per_req, default=0), 1) + 1
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_req):
        tables[b, :nb] = order[used : used + nb].to(torch.int32)
        used += nb
    paged = PagedKV(
        pool=pool,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
    )
    fill_random(paged, generator)
    return paged


def fill_random(paged: PagedKV, generator: torch.Generator | None = None) -> None:
    """Random data in every valid token slot."""
    page = paged.k_cache.shape[1]
    for b, n in enumerate(paged.context_lens.tolist()):
        for cache in (paged.k_cache, paged.v_cache):
            nb = -(-n // page)
            blocks = paged.block_tables[b, :nb].long()
            data = torch.randn(nb * page, *cache.shape[2:], generator=generator)
            data = data.to(device=cache.device, dtype=cache.dtype).view(nb, page, *cache.shape[2:])
            full, rest = divmod(n, page)
            cache[blocks[:full]] = data[:full]
            if rest:
                cache[blocks[full], :rest] = data[full, :rest]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def poison_before(paged: PagedKV, starts: list[int]) -> None:
    """NaN in the slots of positions ``< starts[b]`` of request b: a kernel that must not read
    them (keys older than a sliding window) shows NaN if it does."""
    page = paged.k_cache.shape[1]
    for b, start in enumerate(starts):
        for t in range(max(start, 0)):
            block = int(paged.block_tables[b, t // page])
            paged.k_cache[block, t % page] = float("nan")
            paged.v_cache[block, t % page] = float("nan")


def window_unread_before(requests: list[tuple[int, int]], window: int, block_n: int) -> list[int]:
    """Per (cached prefix, new tokens) request: the positions before the key chunk (of
    ``block_n``) holding the oldest key its first query sees, which prefill attention under
    a sliding ``window`` never reads."""
    return [max(prefix - window + 1, 0) // block_n * block_n for prefix, _ in requests]
