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
    """`num_blocks` host blocks (0: the tier is off). Every taken block belongs to one node."""

    __slots__ = ("pool", "evictable")

    def __init__(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, reserve_null=False)
        self.evictable = EvictionQueue()  # host leaves no admission has claimed

    @property
    def enabled(self) -> bool:
        return self.pool.capacity > 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def allocate(self, drop: Callable[[RadixNode], None]) -> int | None:
        """A host block for a new offload: a free one, else the block of the next evictable
        host leaf, which `drop` takes out of the tree first. None when neither exists."""
        block = self.pool.allocate()
        if block is not None:
            return block
        node = self.evictable.pop()
        if node is None:
            return None
        block = node.block
        drop(node)
        return block

    def release(self, block: int) -> None:
        """The node owning `block` is gone (removed or onboarded): the block is free again."""
        self.pool.unref(block)
        self.pool.free(block)
