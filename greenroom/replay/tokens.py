"""Deterministic synthetic prompt tokens.

Token ids come from a counter-based hash (splitmix64 of seed, stream, key and position), so
they depend only on their inputs, never on call order or the numpy version: the same Mooncake
hash id always maps to the same 512 tokens, and a replay can be repeated exactly.
"""

from __future__ import annotations

import numpy as np

BLOCK_TOKENS = 512  # tokens behind one Mooncake hash id

_STREAM_BLOCK = 1  # tokens of a shared prefix block (Mooncake hash id)
_STREAM_REQUEST = 2  # tokens private to one request

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _key(seed: int, stream: int, key: int) -> np.uint64:
    with np.errstate(over="ignore"):
        k = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        k = _mix(k ^ np.uint64(stream))
        k = _mix(k ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF))
    return k[0]


def synth_tokens(seed: int, stream: int, key: int, length: int, vocab_size: int) -> np.ndarray:
    """`length` token ids in [0, vocab_size) determined by (seed, stream, key)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    base = _key(seed, stream, key)
    with np.errstate(over="ignore"):
        pos = np.arange(length, dtype=np.uint64) * _GOLDEN
        return (_mix(pos + base) % np.uint64(vocab_size)).astype(np.int32)


def block_tokens(hash_id: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The 512 tokens of a Mooncake prefix block; equal hash ids give equal tokens."""
    return synth_tokens(seed, _STREAM_BLOCK, hash_id, BLOCK_TOKENS, vocab_size)


def request_tokens(index: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Tokens private to request `index` of a trace (no sharing between requests)."""
    return synth_tokens(seed, _STREAM_REQUEST, index, length, vocab_size)


class BlockTokenCache:
    """Memoises prefix blocks so a hash id shared by many requests is generated once."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seed = seed
        self._blocks: dict[int, np.ndarray] = {}

    def get(self, hash_id: int) -> np.ndarray:
        block = self._blocks.get(hash_id)
        if block is None:
            block = block_tokens(hash_id, self.vocab_size, self.seed)
            self._blocks[hash_id] = block
        return block

    def prompt(self, hash_ids: list[int], length: int, index: int) -> np.ndarray:
        """A prompt of `length` tokens: the blocks of `hash_ids` in order, cut at `length`.

        If the hash ids cover fewer than `length` tokens, the rest is private to the request.
        """
        n_blocks = min(len(hash_ids), -(-length // BLOCK_TOKENS))
        parts = [self.get(h) for h in hash_ids[:n_blocks]]
        covered = n_blocks * BLOCK_TOKENS
        if covered < length:
            parts.append(request_tokens(index, length - covered, self.vocab_size, self.seed))
        if not parts:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(parts)[:length]
