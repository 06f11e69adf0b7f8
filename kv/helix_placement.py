"""Helix placement: which context-parallel (CP) rank holds each KV block of a request.

A request's KV is cut into blocks of ``tokens_per_block`` tokens, and the blocks are dealt to
the ``cp_size`` ranks in one round-robin sequence:

- prompt block ``i`` lives on rank ``i mod cp_size``;
- decode tokens go by decode block: the token of decode iteration ``t`` (1-based, the first
  token sampled after the prompt is iteration 1) belongs to decode block
  ``d = (t - 1) // tokens_per_block``, which lives on rank ``(P + d) mod cp_size`` where ``P``
  is the number of prompt blocks. That rank is the request's *active* rank for the token: the
  only one that allocates and appends it.

Continuing the prompt's round-robin (``P + d`` rather than ``d``) keeps every request's
per-rank block counts within one of each other at every step, whatever the prompt length;
when ``P`` is a multiple of ``cp_size`` it is the same as placing decode block ``d`` on rank
``d mod cp_size``. Decode tokens never fill the prompt's last partial block: a partial block
stays where the prompt put it, so the active rank changes only at decode-block boundaries.
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

    def num_prompt_blocks(self, prompt_len: int) -> int:
        return -(-prompt_len // self.tokens_per_block)

    def prompt_block_rank(self, block_index: int) -> int:
        return block_index % self.cp_size

    def decode_block_index(self, decode_iter: int) -> int:
        if decode_iter < 1:
            raise ValueError(f"decode_iter = {decode_iter} is invalid: iterations start at 1")
        return (decode_iter - 1) // self.tokens_per_block

    def active_rank(self, prompt_len: int, decode_iter: int) -> int:
        """The one rank that appends the token of decode iteration ``decode_iter``."""
        d = self.decode_block_index(decode_iter)
        return (self.num_prompt_blocks(prompt_len) + d) % self.cp_size

    def opens_block(self, decode_iter: int) -> bool:
        """Whether the token of ``decode_iter`` is the first of a new decode block."""
        return (decode_iter - 1) % self.tokens_per_block == 0

    def block_ranks(self, prompt_len: int, num_decoded: int) -> list[int]:
        """Owner rank of every block, in the request's global block order."""
        prompt = self.num_prompt_blocks(prompt_len)
        decode = -(-num_decoded // self.tokens_per_block)
        return [i % self.cp_size for i in range(prompt + decode)]

    def blocks_per_rank(self, prompt_len: int, num_decoded: int) -> list[int]:
        counts = [0] * self.cp_size
        for r in self.block_ranks(prompt_len, num_decoded):
            counts[r] += 1
        return counts

    def tokens_per_rank(self, prompt_len: int, num_decoded: int) -> list[int]:
        """KV tokens each rank holds for the request (its shard's context length)."""
        tpb, cp = self.tokens_per_block, self.cp_size
        counts = [0] * cp
        prompt_blocks = self.num_prompt_blocks(prompt_len)
        for i in range(prompt_blocks):
            counts[i % cp] += min(tpb, prompt_len - i * tpb)
        for d in range(-(-num_decoded // tpb)):
            counts[(prompt_blocks + d) % cp] += min(tpb, num_decoded - d * tpb)
        return counts

    def shard_lengths(self, prompt_len: int, num_decoded: int, rank: int) -> tuple[int, int]:
        """Tokens ``rank`` holds of the prompt and of the decoded tokens: its shard is these
        two runs of blocks, each filled from its start (see :mod:`greenroom.models.helix_attention`)."""
        tpb, cp = self.tokens_per_block, self.cp_size
        prompt_blocks = self.num_prompt_blocks(prompt_len)
        prompt = sum(min(tpb, prompt_len - i * tpb) for i in range(rank, prompt_blocks, cp))
        decode = 0
        for d in range(-(-num_decoded // tpb)):
            if (prompt_blocks + d) % cp == rank:
                decode += min(tpb, num_decoded - d * tpb)
        return prompt, decode

    def positions_on_rank(self, prompt_len: int, num_decoded: int, rank: int) -> list[int]:
        """Global positions of the tokens ``rank`` holds, in storage order."""
        tpb, cp = self.tokens_per_block, self.cp_size
        out: list[int] = []
        prompt_blocks = self.num_prompt_blocks(prompt_len)
        for i in range(rank, prompt_blocks, cp):
            out.extend(range(i * tpb, min((i + 1) * tpb, prompt_len)))
        for d in range(-(-num_decoded // tpb)):
            if (prompt_blocks + d) % cp == rank:
                start = prompt_len + d * tpb
                out.extend(range(start, min(start + tpb, prompt_len + num_decoded)))
        return out
