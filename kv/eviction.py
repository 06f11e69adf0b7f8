"""Eviction order over cached blocks: lowest retention priority first, then least recently used.

A binary heap with lazy deletion: `discard` only marks a node, stale entries are skipped by
`pop` and dropped in bulk once they outnumber the live ones, so every operation is O(log n)
amortized and nothing scans the whole cache.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from greenroom.kv.radix_tree import RadixNode


class EvictionQueue:
    """The evictable nodes of one tier. Ties in priority and age go to the deeper node."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, int, RadixNode]] = []
        self._live = 0
        self._seq = count()

    def __len__(self) -> int:
        return self._live

    def __contains__(self, node: RadixNode) -> bool:
        return node.queue is self

    def push(self, node: RadixNode) -> None:
        """Make `node` evictable with its current priority and last access time."""
        if node.queue is not None:
            node.queue.discard(node)
        seq = next(self._seq)
        node.queue = self
        node.queue_seq = seq
        heapq.heappush(self._heap, (node.priority, node.last_access, -node.depth, seq, node))
        self._live += 1
        if len(self._heap) > 2 * self._live + 64:
            self._compact()

    def discard(self, node: RadixNode) -> None:
        """Stop considering `node` (no-op when it is not queued here)."""
        if node.queue is self:
            node.queue = None
            self._live -= 1

    def pop(self) -> RadixNode | None:
        """Remove and return the next node to evict, or None when nothing is evictable."""
        heap = self._heap
        while heap:
            *_, seq, node = heapq.heappop(heap)
            if node.queue is self and node.queue_seq == seq:
                node.queue = None
                self._live -= 1
                return node
        return None

    def peek(self) -> RadixNode | None:
        heap = self._heap
        while heap:
            node = heap[0][-1]
            if node.queue is self and node.queue_seq == heap[0][3]:
                return node
            heapq.heappop(heap)
        return None

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[-1].queue is self and e[-1].queue_seq == e[3]]
        heapq.heapify(self._heap)
