"""A forward batch as one Helix context-parallel (CP) rank sees it.

The plan's block tables are global (block ``j`` of a request on rank ``j mod cp_size``, global
id = rank * blocks_per_rank + local id, see greenroom.kv.block_pool). CP rank ``r`` keeps its
blocks only, as local ids into its own pool: its table row lists the request's blocks
``r, r + cp, ...`` in order, so its shard is a run of blocks filled from the start (one partial
block at most, its last) of ``shard_length`` tokens, which is what the paged kernels read. A
token whose block is on another rank is written to a skip slot (negative on CUDA, the null
block on the CPU reference). Local shard slot ``s`` holds global position
``(rank + (s // tpb) * cp) * tpb + s % tpb``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from greenroom.bus.messages import BlockCopy
from greenroom.kv.helix_placement import HelixPlacement
from greenroom.models.batch import SequenceChunk, upload_packed


@dataclass(frozen=True)
class HelixRank:
    """Where this process sits in its CP group and how the blocks are laid out."""

    placement: HelixPlacement
    rank: int
    blocks_per_rank: int  # the pool of every CP rank, its null block included
    group: object = None  # torch.distributed ProcessGroup of the CP ranks
    host_blocks_per_rank: int = 0  # the host tier of every CP rank (kv.host_blocks)

    @property
    def cp_size(self) -> int:
        return self.placement.cp_size

    @property
    def first_block(self) -> int:
        return self.rank * self.blocks_per_rank

    def own_copies(self, copies: list[BlockCopy]) -> list[BlockCopy]:
        """The host-tier copies whose GPU block is this rank's, with local ids on both sides.

        Block j of every cached prefix is on rank j mod cp_size, and the KV manager offloads a
        rank's GPU block into a host block of the same rank (host id = rank *
        host_blocks_per_rank + local id), so each rank copies its own blocks between its own
        GPU and host pools."""
        out = []
        end = self.first_block + self.blocks_per_rank
        host_first = self.rank * self.host_blocks_per_rank
        for c in copies:
            offload = c.kind == "offload"
            gpu, host = (c.src, c.dst) if offload else (c.dst, c.src)
            if not self.first_block <= gpu < end:
                continue
            gpu, host = gpu - self.first_block, host - host_first
            out.append(BlockCopy(c.kind, gpu, host) if offload else BlockCopy(c.kind, host, gpu))
        return out

    def to_local(self, block: int) -> int:
        local = block - self.first_block
        if not 0 < local < self.blocks_per_rank:
            raise ValueError(f"block {block} is not a block of CP rank {self.rank}")
        return local


@dataclass
class HelixView:
    block_tables: torch.Tensor  # [B, max local blocks] int32, local ids, padded with 0
    shard_lens: torch.Tensor  # [B] int32: tokens this rank holds of each request
    slot_mapping: torch.Tensor  # [T] int64: local slots, skip slot for other ranks' tokens
    host_shard_lens: np.ndarray  # the same on the host

    @classmethod
    def build(
        cls, chunks: list[SequenceChunk], helix: HelixRank, device: torch.device
    ) -> HelixView:
        p, rank, cp = helix.placement, helix.rank, helix.cp_size
        tpb = p.tokens_per_block
        skip = -1 if device.type == "cuda" else 0
        rows: list[list[int]] = []
        lens = np.zeros(len(chunks), dtype=np.int64)
        slots: list[np.ndarray] = []
        for i, c in enumerate(chunks):
            end = c.num_cached + len(c.token_ids)
            needed = p.num_blocks(end)
            local = [helix.to_local(b) for b in c.block_ids[rank:needed:cp]]
            rows.append(local)
            lens[i] = p.shard_length(end, rank)
            pos = np.arange(c.num_cached, end)
            block = pos // tpb
            mine = block % cp == rank
            table = np.asarray(local + [0], dtype=np.int64)
            slot = table[np.where(mine, block // cp, len(local))] * tpb + pos % tpb
            slots.append(np.where(mine, slot, skip))
        width = max(1, max(len(r) for r in rows))
        tables = np.zeros((len(chunks), width), dtype=np.int64)
        for i, r in enumerate(rows):
            tables[i, : len(r)] = r
        (slot_mapping,), (block_tables, shard_lens) = upload_packed(
            [np.concatenate(slots)], [tables, lens], device
        )
        return cls(block_tables, shard_lens, slot_mapping, lens)
