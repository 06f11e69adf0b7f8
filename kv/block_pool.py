"""A fixed pool of KV blocks: reference counts and O(1) LRU free lists, one per rank.

The pool knows nothing about what a block holds. A block is either free (in a free list,
reference count 0) or taken; who holds a taken block (requests, the prefix tree) is decided by
the caller, which returns it with `free` once nobody needs its contents.

With Helix context parallelism the pool spans `ranks` CP ranks of `blocks_per_rank` blocks
each: global block id = rank * blocks_per_rank + local id, and each rank has its own free list
(and, with `reserve_null`, its own null block, local id 0).
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    """`num_blocks` blocks over `ranks` ranks; with `reserve_null`, the first block of every
    rank is never handed out."""

    __slots__ = ("num_blocks", "first_block", "ranks", "blocks_per_rank", "refcounts", "_free")

    def __init__(self, num_blocks: int, reserve_null: bool = True, ranks: int = 1) -> None:
        first = 1 if reserve_null else 0
        if ranks < 1 or num_blocks % ranks:
            raise ValueError(f"num_blocks = {num_blocks} cannot be split over {ranks} rank(s)")
        if num_blocks // ranks < first:
            raise ValueError(f"num_blocks = {num_blocks} is invalid: must be >= {first * ranks}")
        self.num_blocks = num_blocks
        self.first_block = first
        self.ranks = ranks
        self.blocks_per_rank = bpr = num_blocks // ranks
        self.refcounts = [0] * num_blocks
        # Insertion order is release order: the front is the least recently freed block.
        self._free: list[OrderedDict[int, None]] = [
            OrderedDict.fromkeys(range(r * bpr + first, (r + 1) * bpr)) for r in range(ranks)
        ]

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (the null blocks excluded)."""
        return self.num_blocks - self.first_block * self.ranks

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free)

    def num_free_on(self, rank: int) -> int:
        return len(self._free[rank])

    def rank_of(self, block: int) -> int:
        return block // self.blocks_per_rank

    def is_null(self, block: int) -> bool:
        return block % self.blocks_per_rank < self.first_block

    def is_free(self, block: int) -> bool:
        return block in self._free[self.rank_of(block)]

    def allocate(self, refs: int = 1, rank: int = 0) -> int | None:
        """Take `rank`'s least recently freed block with `refs` references, or None when that
        rank has none free."""
        free = self._free[rank]
        if not free:
            return None
        block, _ = free.popitem(last=False)
        self.refcounts[block] = refs
        return block

    def free(self, block: int) -> None:
        """Return an unreferenced block to the back of its rank's free list."""
        if block < 0 or block >= self.num_blocks or self.is_null(block):
            raise ValueError(f"block {block} is not a block of this pool")
        if self.refcounts[block] != 0:
            raise ValueError(f"block {block} is freed with {self.refcounts[block]} references")
        free = self._free[self.rank_of(block)]
        if block in free:
            raise ValueError(f"block {block} is freed twice")
        free[block] = None

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
        """Free blocks, each rank's least recently freed first (O(n): for tests and checks)."""
        return [b for f in self._free for b in f]
