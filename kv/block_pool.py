"""A fixed pool of KV blocks: reference counts and an O(1) LRU free list.

The pool knows nothing about what a block holds. A block is either free (in the free list,
reference count 0) or taken; who holds a taken block (requests, the prefix tree) is decided by
the caller, which returns it with `free` once nobody needs its contents.
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    """`num_blocks` blocks; with `reserve_null`, block 0 is never handed out."""

    __slots__ = ("num_blocks", "first_block", "refcounts", "_free")

    def __init__(self, num_blocks: int, reserve_null: bool = True) -> None:
        first = 1 if reserve_null else 0
        if num_blocks < first:
            raise ValueError(f"num_blocks = {num_blocks} is invalid: must be >= {first}")
        self.num_blocks = num_blocks
        self.first_block = first
        self.refcounts = [0] * num_blocks
        # Insertion order is release order: the front is the least recently freed block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, num_blocks))

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (the null block excluded)."""
        return self.num_blocks - self.first_block

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free

    def allocate(self, refs: int = 1) -> int | None:
        """Take the least recently freed block with `refs` references, or None when empty."""
        if not self._free:
            return None
        block, _ = self._free.popitem(last=False)
        self.refcounts[block] = refs
        return block

    def free(self, block: int) -> None:
        """Return an unreferenced block to the back of the free list."""
        if block < self.first_block or block >= self.num_blocks:
            raise ValueError(f"block {block} is not a block of this pool")
        if self.refcounts[block] != 0:
            raise ValueError(f"block {block} is freed with {self.refcounts[block]} references")
        if block in self._free:
            raise ValueError(f"block {block} is freed twice")
        self._free[block] = None

    def ref(self, block: int) -> int:
        """Add one reference; returns the new count."""
        count = self.refcounts[block] + 1
        self.refcounts[block] = count
        return count

    def unref(self, block: int) -> int:
        """Drop one reference; returns the new count (the caller frees at zero)."""
        count = self.refcounts[block] - 1
        if count < 0:
            raise ValueError(f"block {block} has no reference to drop")
        self.refcounts[block] = count
        return count

    def free_blocks(self) -> list[int]:
        """Free blocks, least recently freed first (O(n): for tests and checks)."""
        return list(self._free)
