"""Work tiles of prefill attention: one (request, query block) pair per program.

Prefill attention normally launches a grid of (query blocks of the longest request, heads,
requests), so its shape follows the batch. A CUDA graph needs a launch shape fixed at capture:
there the kernel runs over a fixed-length tile list instead, built on the host per batch. Tile
``t`` covers query block ``tiles[1, t]`` of request ``tiles[0, t]``; unused tiles carry a query
block past any request (the program returns at once). Tiles are ordered by the number of keys
they read, most first, so the longest-running programs start first (with a sliding window
a tile reads at most the window plus its own queries).
"""

from __future__ import annotations

import numpy as np

# The query block of graph-captured prefill attention (the tile list is built for it).
TILE_BLOCK_M = 64
# The query block index of an unused tile: past any request's queries.
UNUSED_TILE = 1 << 20


def max_tiles(num_tokens: int, num_requests: int, block_m: int = TILE_BLOCK_M) -> int:
    """Tiles enough for any batch of at most ``num_tokens`` tokens over ``num_requests``
    requests: each request's last block may be partial."""
    return -(-num_tokens // block_m) + num_requests


def prefill_tiles(
    q_lens: np.ndarray,
    context_lens: np.ndarray,
    num_tiles: int,
    block_m: int = TILE_BLOCK_M,
    window: int = 0,
) -> np.ndarray:
    """int32 ``[2, num_tiles]``: (request, query block) per tile, busiest first, then unused.
    ``window > 0``: every layer attends over that sliding window (only the order changes)."""
    q_lens = np.asarray(q_lens, dtype=np.int64)
    blocks = -(-q_lens // block_m)
    total = int(blocks.sum())
    if total > num_tiles:
        raise ValueError(f"the batch needs {total} attention tiles but only {num_tiles} fit")
    request = np.repeat(np.arange(len(q_lens)), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    block = np.arange(total) - first
    prefix = np.asarray(context_lens, dtype=np.int64)[request] - q_lens[request]
    keys = np.minimum(prefix + (block + 1) * block_m, prefix + q_lens[request])
    if window > 0:
        keys = np.minimum(keys, window + block_m)
    order = np.argsort(-keys, kind="stable")
    tiles = np.empty((2, num_tiles), dtype=np.int32)
    tiles[0, :total] = request[order]
    tiles[1, :total] = block[order]
    tiles[0, total:] = 0
    tiles[1, total:] = UNUSED_TILE
    return tiles


__all__ = ["TILE_BLOCK_M", "UNUSED_TILE", "max_tiles", "prefill_tiles"]
