"""Block state across both tiers: the GPU pool, the prefix tree and the host tier.

A GPU block is in exactly one state: free (in the pool's free list), held (referenced by
requests; maybe also a tree node) or idle cached (a tree node nobody references). Idle cached
blocks count as free space: `allocate` takes a truly free block first, else evicts the idle
leaf of lowest priority, least recently used, offloading it to the host tier when its priority
allows and a host block can be had.

Every copy the engine must run is appended to `copies` in the order decided, which is also a
valid execution order: an offload of block g is recorded before g is handed out again, and a
host block is released only after the onboard reading it is recorded.

With Helix context parallelism (`cp_size` > 1) GPU blocks belong to CP ranks (see
block_pool.py) and `allocate(rank=...)` hands out a block of that rank: a free one, else an
idle cached one of that rank, evicting idle blocks of other ranks first where they sit below it
in the tree. Each rank has its own eviction queue and idle count.
"""

from __future__ import annotations

from greenroom.bus.messages import BlockCopy
from greenroom.kv.block_pool import BlockPool
from greenroom.kv.events import OFFLOADED, ONBOARDED, REMOVED, STORED, EventLog
from greenroom.kv.eviction import EvictionQueue
from greenroom.kv.host_tier import HostTier
from greenroom.kv.radix_tree import RadixNode, RadixTree


class PrefixCache:
    """GPU and host block state; all methods are O(1) or O(log n) except subtree drops."""

    def __init__(
        self,
        num_gpu_blocks: int,
        host_blocks: int,
        offload_min_priority: int,
        events: EventLog,
        cp_size: int = 1,
    ) -> None:
        self.gpu = BlockPool(num_gpu_blocks, reserve_null=True, ranks=cp_size)
        self.host = HostTier(host_blocks, ranks=cp_size)
        self.tree = RadixTree()
        # per rank: GPU nodes with no reference and no GPU child
        self.evictable = [EvictionQueue() for _ in range(cp_size)]
        self.node_of_block: list[RadixNode | None] = [None] * num_gpu_blocks
        self.num_idle_cached = 0  # GPU nodes with no reference
        self.idle_on = [0] * cp_size  # the same, per rank
        self.offload_min_priority = offload_min_priority
        self.events = events
        self.copies: list[BlockCopy] = []
        self.clock = 0
        self.offloaded_blocks = 0
        self.onboarded_blocks = 0

    @property
    def num_free(self) -> int:
        """GPU blocks `allocate` can hand out: truly free plus idle cached."""
        return self.gpu.num_free + self.num_idle_cached

    def num_free_on(self, rank: int) -> int:
        """GPU blocks `allocate(rank=rank)` can hand out."""
        return self.gpu.num_free_on(rank) + self.idle_on[rank]

    def _idle(self, block: int, delta: int) -> None:
        self.num_idle_cached += delta
        self.idle_on[self.gpu.rank_of(block)] += delta

    def _queue(self, node: RadixNode) -> None:
        """Make a GPU node evictable (its rank's queue)."""
        self.evictable[self.gpu.rank_of(node.block)].push(node)

    def _unqueue(self, node: RadixNode) -> None:
        """Stop considering a GPU node for eviction (no-op when it is not queued)."""
        if node.on_gpu and not node.is_root:
            self.evictable[self.gpu.rank_of(node.block)].discard(node)

    def _pop_evictable(self) -> RadixNode | None:
        """The next GPU node to evict, over every rank."""
        if len(self.evictable) == 1:
            return self.evictable[0].pop()
        best: tuple | None = None
        best_queue = None
        for q in self.evictable:
            node = q.peek()
            if node is not None:
                key = (node.priority, node.last_access, -node.depth)
                if best is None or key < best:
                    best, best_queue = key, q
        return best_queue.pop() if best_queue is not None else None

    def tick(self) -> int:
        """A new access time (a counter: orders accesses within one step too)."""
        self.clock += 1
        return self.clock

    def take_copies(self) -> list[BlockCopy]:
        copies, self.copies = self.copies, []
        return copies

    # ------------------------------------------------------------------ references

    def ref(self, block: int) -> None:
        if self.gpu.ref(block) == 1:
            node = self.node_of_block[block]
            if node is not None:
                self._idle(block, -1)
                self._unqueue(node)

    def unref(self, block: int) -> None:
        if self.gpu.unref(block) == 0:
            node = self.node_of_block[block]
            if node is None:
                self.gpu.free(block)
            else:
                self._idle(block, 1)
                if not node.gpu_children:
                    self._queue(node)

    def claim(self, node: RadixNode) -> None:
        """Promise a matched node to an admission: it leaves the eviction queues."""
        if node.on_gpu:
            self.ref(node.block)
        else:
            node.claims += 1
            self.host.discard(node)

    def release_claim(self, node: RadixNode) -> None:
        """Undo `claim` (if the node was onboarded since, the claim became a reference)."""
        if node.on_gpu:
            self.unref(node.block)
            return
        node.claims -= 1
        if node.claims == 0 and not node.children:
            self.host.push(node)

    # ------------------------------------------------------------------ allocation

    def allocate(self, refs: int = 1, rank: int = 0) -> int:
        """A GPU block of `rank` with `refs` references; the caller checked `num_free_on`."""
        block = self.gpu.allocate(refs, rank)
        if block is None:
            while not self.evictable[rank]:
                # Every idle block of `rank` sits under idle blocks of other ranks only.
                self.gpu.free(self._evict_one())
            block = self._evict_one(rank)
            self.gpu.refcounts[block] = refs
        return block

    def evict(self, max_blocks: int) -> int:
        """Evict up to `max_blocks` idle cached blocks to the free list; returns how many."""
        done = 0
        while done < max_blocks and self.num_idle_cached:
            self.gpu.free(self._evict_one())
            done += 1
        return done

    def drop_idle(self) -> int:
        """The engine's KV memory is gone (it restarted): forget every cached block no request
        holds, GPU and host, copying nothing; returns the GPU blocks freed."""
        dropped = 0
        while self.num_idle_cached:
            node = self._pop_evictable()
            assert node is not None and node.parent is not None
            block, parent = node.block, node.parent
            self.node_of_block[block] = None
            self._idle(block, -1)
            self._drop_subtree(node)
            self.gpu.free(block)
            dropped += 1
            if (
                not parent.is_root
                and not parent.gpu_children
                and self.gpu.refcounts[parent.block] == 0
            ):
                self._queue(parent)
        while (leaf := self.host.pop_any()) is not None:
            block = leaf.block
            self._drop_host_leaf(leaf)
            self.host.release(block)
        return dropped

    def _evict_one(self, rank: int | None = None) -> int:
        node = self._pop_evictable() if rank is None else self.evictable[rank].pop()
        if node is None:
            raise RuntimeError("no GPU block is free or evictable")
        block, parent = node.block, node.parent
        assert parent is not None
        self.node_of_block[block] = None
        self._idle(block, -1)
        host_block = None
        if node.priority >= self.offload_min_priority and self.host.enabled:
            host_block = self.host.allocate(self._drop_host_leaf, self.gpu.rank_of(block))
        if host_block is None:
            self._drop_subtree(node)
        else:
            self.copies.append(BlockCopy("offload", block, host_block))
            self.tree.move(node, on_gpu=False, block=host_block)
            self.offloaded_blocks += 1
            self.events.record(OFFLOADED, "host", node.hash)
            if not node.children:
                self.host.push(node)
        if not parent.is_root and not parent.gpu_children and self.gpu.refcounts[parent.block] == 0:
            self._queue(parent)
        return block

    def _drop_host_leaf(self, node: RadixNode) -> None:
        """Take an evicted host leaf out of the tree; its host block is reused by the caller."""
        parent = node.parent
        assert parent is not None
        self.tree.remove(node)
        self.events.record(REMOVED, "host", node.hash)
        if not parent.on_gpu and not parent.children and not parent.claims:
            self.host.push(parent)

    def _drop_subtree(self, node: RadixNode) -> None:
        """Remove an evicted GPU node and its host descendants (none of them is claimed: a
        claim covers a whole path from the root, and this node is unreferenced)."""
        order, stack = [], [node]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # children before parents
            if n is node:
                self.tree.remove(n)
                self.events.record(REMOVED, "gpu", n.hash)
            else:
                self.host.discard(n)
                self.tree.remove(n)
                self.host.release(n.block)
                self.events.record(REMOVED, "host", n.hash)

    # ------------------------------------------------------------------ tier moves

    def onboard(self, node: RadixNode, rank: int = 0) -> int:
        """Copy a claimed host node into a new GPU block of `rank`; every claim becomes a
        reference."""
        assert not node.on_gpu and node.claims > 0
        gpu_block = self.allocate(refs=0, rank=rank)
        host_block = node.block
        self.copies.append(BlockCopy("onboard", host_block, gpu_block))
        self._move_to_gpu(node, gpu_block)
        self.host.release(host_block)
        self.onboarded_blocks += 1
        self.events.record(ONBOARDED, "gpu", node.hash)
        return gpu_block

    def adopt(self, node: RadixNode, block: int) -> None:
        """A request computed the same block a host node holds: the node takes the request's
        (referenced) GPU block instead, no copy needed, and its host block is freed."""
        assert not node.on_gpu and self.node_of_block[block] is None
        host_block = node.block
        self._move_to_gpu(node, block)
        self.host.release(host_block)
        self.events.record(ONBOARDED, "gpu", node.hash)

    def _move_to_gpu(self, node: RadixNode, block: int) -> None:
        self.host.discard(node)
        self.tree.move(node, on_gpu=True, block=block)
        self.node_of_block[block] = node
        self.gpu.refcounts[block] += node.claims
        node.claims = 0
        assert node.parent is not None
        self._unqueue(node.parent)
        if self.gpu.refcounts[block] == 0:
            self._idle(block, 1)
            self._queue(node)

    def insert(
        self, parent: RadixNode, h: int, tokens: tuple[int, ...], block: int, priority: int
    ) -> RadixNode:
        """Make a held, fully computed GPU block matchable under `parent`."""
        assert self.node_of_block[block] is None and self.gpu.refcounts[block] > 0
        node = self.tree.add(parent, h, tokens, block, True, priority, self.clock)
        self.node_of_block[block] = node
        self._unqueue(parent)
        self.events.record(STORED, "gpu", h)
        return node
