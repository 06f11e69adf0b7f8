"""BlockPool: null block, refcounts, LRU free list; EvictionQueue: priority then LRU."""

from __future__ import annotations

import pytest

from greenroom.kv.block_pool import NULL_BLOCK, BlockPool
from greenroom.kv.eviction import EvictionQueue
from greenroom.kv.radix_tree import RadixNode


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.capacity == 3 and pool.num_free == 3
    got = [pool.allocate() for _ in range(3)]
    assert sorted(got) == [1, 2, 3] and NULL_BLOCK not in got
    assert pool.allocate() is None
    with pytest.raises(ValueError):
        pool.free(NULL_BLOCK)


def test_pool_without_null_block_uses_block_zero():
    pool = BlockPool(2, reserve_null=False)
    assert pool.capacity == 2
    assert {pool.allocate(), pool.allocate()} == {0, 1}


def test_free_list_hands_out_least_recently_freed_first():
    pool = BlockPool(5)
    blocks = [pool.allocate() for _ in range(4)]
    assert blocks == [1, 2, 3, 4]
    for b in (3, 1, 4, 2):
        pool.unref(b)
        pool.free(b)
    assert pool.free_blocks() == [3, 1, 4, 2]
    assert [pool.allocate() for _ in range(4)] == [3, 1, 4, 2]


def test_pool_over_cp_ranks_has_a_null_block_and_free_list_per_rank():
    pool = BlockPool(9, ranks=3)  # 3 blocks per rank; global id = rank * 3 + local id
    assert pool.capacity == 6 and [pool.num_free_on(r) for r in range(3)] == [2, 2, 2]
    assert [pool.allocate(rank=2) for _ in range(2)] == [7, 8]
    assert pool.allocate(rank=2) is None and pool.num_free == 4
    assert pool.rank_of(7) == 2 and pool.is_null(6) and not pool.is_null(7)
    with pytest.raises(ValueError, match="not a block"):
        pool.free(3)
    with pytest.raises(ValueError, match="cannot be split"):
        BlockPool(10, ranks=3)


def test_refcounts_and_misuse_are_caught():
    pool = BlockPool(3)
    b = pool.allocate(refs=2)
    assert pool.refcounts[b] == 2
    assert pool.ref(b) == 3
    assert pool.unref(b) == 2
    with pytest.raises(ValueError, match="references"):
        pool.free(b)
    pool.unref(b)
    pool.unref(b)
    with pytest.raises(ValueError, match="no reference"):
        pool.unref(b)
    pool.free(b)
    assert pool.is_free(b)
    with pytest.raises(ValueError, match="twice"):
        pool.free(b)


def _node(priority: int, last_access: int, depth: int = 1) -> RadixNode:
    node = RadixNode(priority * 1000 + last_access, (), None, -1, True, priority, last_access)
    node.depth = depth
    return node


def test_eviction_queue_orders_by_priority_then_age_then_depth():
    q = EvictionQueue()
    old_high, new_low, old_low = _node(50, 1), _node(10, 9), _node(10, 2)
    shallow, deep = _node(20, 5, depth=1), _node(20, 5, depth=3)
    for n in (old_high, new_low, old_low, shallow, deep):
        q.push(n)
    assert len(q) == 5
    assert [q.pop() for _ in range(5)] == [old_low, new_low, deep, shallow, old_high]
    assert q.pop() is None and len(q) == 0


def test_eviction_queue_discard_and_requeue_with_new_key():
    q = EvictionQueue()
    a, b = _node(10, 1), _node(10, 2)
    q.push(a)
    q.push(b)
    q.discard(a)
    assert a not in q and len(q) == 1
    assert q.peek() is b
    a.last_access = 3
    q.push(a)
    b.priority = 90
    q.push(b)  # re-push with a new key replaces the old entry
    assert len(q) == 2
    assert [q.pop(), q.pop()] == [a, b]


def test_eviction_queue_compacts_stale_entries():
    q = EvictionQueue()
    nodes = [_node(1, i) for i in range(200)]
    for _ in range(5):
        for n in nodes:
            q.push(n)
    assert len(q) == 200
    assert len(q._heap) <= 2 * 200 + 64 + 1
    for n in nodes[:150]:
        q.discard(n)
    assert [q.pop() for _ in range(50)] == nodes[150:]
