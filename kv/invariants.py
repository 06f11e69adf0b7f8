"""Full consistency check of a KVCacheManager (O(n); for tests and debugging only)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from greenroom.kv.manager import KVCacheManager


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def check_manager(mgr: KVCacheManager) -> None:
    cache, tpb = mgr.cache, mgr.tokens_per_block
    gpu, host, tree = cache.gpu, cache.host, cache.tree
    root = tree.root
    cp = gpu.ranks

    # Requests: block tables, chains of nodes, and the references they account for.
    holders: Counter[int] = Counter()
    for rid, req in mgr.requests.items():
        _check(len(set(req.block_ids)) == len(req.block_ids), f"{rid}: a block twice in its table")
        _check(not any(gpu.is_null(b) for b in req.block_ids), f"{rid}: holds a null block")
        _check(
            all(gpu.rank_of(b) == j % cp for j, b in enumerate(req.block_ids)),
            f"{rid}: a block is not on rank (its index mod cp_size)",
        )
        _check(len(req.nodes) <= len(req.block_ids), f"{rid}: more nodes than blocks")
        parent = root
        for i, node in enumerate(req.nodes):
            _check(node.on_gpu, f"{rid}: node of block {i} is not on the GPU")
            _check(tree.get(node.hash) is node, f"{rid}: node of block {i} left the tree")
            _check(
                node.parent is parent, f"{rid}: node of block {i} is not chained to block {i - 1}"
            )
            _check(
                node.tokens == tuple(req.token_ids[i * tpb : (i + 1) * tpb]),
                f"{rid}: node of block {i} holds other tokens than the request",
            )
            parent = node
        holders.update(req.held_blocks())

    # GPU blocks: each free, held, or an idle tree node; counts match holders.
    idle_on = [0] * cp
    idle = held = free = 0
    for b in range(gpu.num_blocks):
        rc, node = gpu.refcounts[b], cache.node_of_block[b]
        if gpu.is_null(b):
            _check(rc == 0 and not gpu.is_free(b) and node is None, f"null block {b} in use")
            continue
        _check(rc == holders[b], f"block {b}: refcount {rc} but {holders[b]} holders")
        if gpu.is_free(b):
            _check(rc == 0 and node is None, f"block {b}: free and referenced or cached")
            free += 1
        elif rc > 0:
            held += 1
        else:
            _check(node is not None, f"block {b}: lost (not free, not held, not cached)")
            idle += 1
            idle_on[gpu.rank_of(b)] += 1
        if node is not None:
            _check(node.on_gpu and node.block == b, f"block {b}: node map disagrees with the node")
            _check(tree.get(node.hash) is node, f"block {b}: its node left the tree")
    _check(free == gpu.num_free, "free list size disagrees with free blocks")
    _check(idle == cache.num_idle_cached, f"idle cached count {cache.num_idle_cached} != {idle}")
    _check(idle_on == cache.idle_on, f"idle cached per rank {cache.idle_on} != {idle_on}")
    _check(free + held + idle == gpu.capacity, "GPU capacity not conserved")

    # Tree structure, tiers and eviction queues.
    host_blocks: set[int] = set()
    gpu_queued = host_queued = 0
    for node in tree.nodes():
        parent = node.parent
        _check(parent is not None and parent.children.get(node.hash) is node, "broken parent link")
        _check(parent is root or tree.get(parent.hash) is parent, "parent left the tree")
        _check(node.depth == parent.depth + 1, "wrong depth")
        _check(len(node.tokens) == tpb, "a cached block is not full")
        _check(node.claims == 0, "a claim outlived its admission batch")
        gpu_kids = sum(1 for c in node.children.values() if c.on_gpu)
        _check(node.gpu_children == gpu_kids, "GPU child count is off")
        if node.on_gpu:
            _check(parent.on_gpu, "a GPU block under a host block")
            _check(cache.node_of_block[node.block] is node, "GPU node not in the block map")
            _check(gpu.rank_of(node.block) == (node.depth - 1) % cp, f"{node}: on the wrong rank")
            rc = gpu.refcounts[node.block]
            if rc > 0 and parent is not root:
                _check(gpu.refcounts[parent.block] > 0, "a held block under an idle block")
            should_queue = rc == 0 and gpu_kids == 0
            queue = cache.evictable[gpu.rank_of(node.block)]
            _check((node.queue is queue) == should_queue, f"{node}: eviction queue")
            gpu_queued += should_queue
        else:
            _check(node.block not in host_blocks, f"host block {node.block} owned twice")
            host_blocks.add(node.block)
            _check(host.pool.refcounts[node.block] == 1, "host block of a node has refcount != 1")
            _check(not host.pool.is_free(node.block), "host block of a node is free")
            should_queue = not node.children
            queue = host.queue_of(node)
            _check((node.queue is queue) == should_queue, f"{node}: host eviction queue")
            if cp > 1:
                _check(host.pool.rank_of(node.block) == (node.depth - 1) % cp, f"{node}: host rank")
            host_queued += should_queue
    _check(sum(map(len, cache.evictable)) == gpu_queued, "GPU eviction queue holds stale nodes")
    _check(host.num_evictable == host_queued, "host eviction queue holds stale nodes")
    _check(len(host_blocks) + host.num_free == host.capacity, "host capacity not conserved")
    _check(root.gpu_children == sum(1 for c in root.children.values() if c.on_gpu), "root count")
