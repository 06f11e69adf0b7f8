"""Helix placement: which context-parallel (CP) rank holds each KV block of a request.

A request's tokens fill blocks of ``tokens_per_block`` in order (token ``t`` in block
``t // tokens_per_block``, as on one GPU), and block ``j`` lives on rank ``j mod cp_size``:
prompt blocks round-robin, and decode blocks continue the same round-robin. The token at
position ``t`` is appended by one rank only, the request's *active* rank
``(t // tokens_per_block) mod cp_size``; the active rank moves to the next rank each time a
block fills. So at every step a request's per-rank block counts differ by at most one.

With prompt length ``P`` a multiple of ``tokens_per_block``, decode block
``d = (decode_iter - 1) // tokens_per_block`` is global block ``P / tokens_per_block + d``;
when ``P`` is also a multiple of ``tokens_per_block * cp_size`` it lives on rank
``d mod cp_size``. Otherwise decode tokens first fill the prompt's last partial block on its
owner rank, and each rank's shard stays a run of blocks filled from its start (one partial
block at most, its last), which is what the paged attention kernels read. Block ``j`` of every
request is on the same rank, so a cached prefix block is on the rank a new request expects it.
Positions stay global; only the storage is sharded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HelixPlacement:
    cp_size: int
    tokens_per_block: int

    def __post_init__(self) -> None:
        if self.cp_size < 1:
            raise ValueError(f"cp_size = {self.cp_size} is invalid: must be >= 1")
        if self.tokens_per_block < 1:
            raise ValueError(f"tokens_per_block = {self.tokens_per_block} is invalid: must be >= 1")

    def block_rank(self, block_index: int) -> int:
        return block_index % self.cp_size

    def active_rank(self, position: int) -> int:
        """The one rank that stores (appends) the token at global ``position``."""
        return (position // self.tokens_per_block) % self.cp_size

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def blocks_per_rank(self, num_tokens: int) -> list[int]:
        n, cp = self.num_blocks(num_tokens), self.cp_size
        return [n // cp + (1 if r < n % cp else 0) for r in range(cp)]

    def shard_length(self, num_tokens: int, rank: int) -> int:
        """Tokens ``rank`` holds of a request with ``num_tokens`` tokens in its KV."""
        tpb, cp = self.tokens_per_block, self.cp_size
        full_blocks, tail = divmod(num_tokens, tpb)
        held = (full_blocks // cp + (1 if rank < full_blocks % cp else 0)) * tpb
        if tail and full_blocks % cp == rank:
            held += tail
        return held

    def tokens_per_rank(self, num_tokens: int) -> list[int]:
        return [self.shard_length(num_tokens, r) for r in range(self.cp_size)]

    def positions_on_rank(self, num_tokens: int, rank: int) -> list[int]:
        """Global positions of the tokens ``rank`` holds, in storage order."""
        tpb = self.tokens_per_block
        out: list[int] = []
        for j in range(rank, self.num_blocks(num_tokens), self.cp_size):
            out.extend(range(j * tpb, min((j + 1) * tpb, num_tokens)))
        return out

    def local_blocks(self, block_table: list[int], rank: int) -> list[int]:
        """The entries of a request's (global-order) block table that ``rank`` holds."""
        return block_table[rank :: self.cp_size]
