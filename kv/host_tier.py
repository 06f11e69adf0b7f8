"""The host-memory tier: a pool of pinned CPU blocks holding KV evicted from the GPU.

Only the state lives here (which host block holds which cached prefix block, which host blocks
may be reused); the engine owns the pinned tensors and runs the copies the KV manager emits.
"""

from __future__ import annotations

from collections.abc import Callable

from greenroom.kv.block_pool import BlockPool
from greenroom.kv.eviction import EvictionQueue
from greenroom.kv.radix_tree import RadixNode


class HostTier:
    """`num_blocks` host blocks (0: the tier is off). Every taken block belongs to one node.

    With Helix context parallelism the tier spans `ranks` CP ranks like the GPU pool: host
    block id = rank * blocks_per_rank + local id, and a GPU block is offloaded into a host
    block of its own rank (each rank's host memory holds its own blocks), so each rank has its
    own free list and queue of evictable host leaves."""

    __slots__ = ("pool", "evictable")

    def __init__(self, num_blocks: int, ranks: int = 1) -> None:
        self.pool = BlockPool(num_blocks, reserve_null=False, ranks=ranks)
        self.evictable = [EvictionQueue() for _ in range(ranks)]  # leaves no admission claimed

    @property
    def enabled(self) -> bool:
        return self.pool.capacity > 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_evictable(self) -> int:
        return sum(len(q) for q in self.evictable)

    def queue_of(self, node: RadixNode) -> EvictionQueue:
        """The eviction queue of a host node's rank."""
        return self.evictable[self.pool.rank_of(node.block)]

    def push(self, node: RadixNode) -> None:
        self.queue_of(node).push(node)

    def discard(self, node: RadixNode) -> None:
        self.queue_of(node).discard(node)

    def pop_any(self) -> RadixNode | None:
        """An evictable host leaf of any rank, or None."""
        for q in self.evictable:
            node = q.pop()
            if node is not None:
                return node
        return None

    def allocate(self, drop: Callable[[RadixNode], None], rank: int = 0) -> int | None:
        """A host block of `rank` for a new offload: a free one, else the block of that rank's
        next evictable host leaf, which `drop` takes out of the tree first. None when neither
        exists (the GPU block is then dropped instead of offloaded)."""
        block = self.pool.allocate(rank=rank)
        if block is not None:
            return block
        node = self.evictable[rank].pop()
        if node is None:
            return None
        block = node.block
        drop(node)
        return block

    def release(self, block: int) -> None:
        """The node owning `block` is gone (removed or onboarded): the block is free again."""
        self.pool.unref(block)
        self.pool.free(block)
