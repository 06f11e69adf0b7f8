"""Radix prefix tree: chained hashes, salts, lookups, and which cached blocks get evicted."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import count

import pytest

from greenroom.bus.messages import KVAdmit, KVComputed, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager
from greenroom.kv.radix_tree import ROOT_HASH, RadixTree, block_hash, extra_key

TPB = 4
_iteration = count()


def test_block_hash_chains_the_whole_prefix():
    a0, b0 = block_hash(ROOT_HASH, (1, 2), 0), block_hash(ROOT_HASH, (9, 9), 0)
    # the same second block after different first blocks: different keys
    assert block_hash(a0, (3, 4), 0) != block_hash(b0, (3, 4), 0)
    assert block_hash(a0, (3, 4), 0) == block_hash(a0, (3, 4), 0)
    assert block_hash(a0, (3, 4), extra_key("salt")) != block_hash(a0, (3, 4), 0)
    assert extra_key(None) == extra_key("") == 0
    assert extra_key("x") != extra_key("y")


def test_hashes_are_stable_across_processes():
    code = (
        "from greenroom.kv.radix_tree import block_hash, extra_key;"
        "print(block_hash(block_hash(0, (1, 2, 3), extra_key('t')), (4, 5, 6), extra_key('t')))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_tree_lookup_checks_parent_and_tokens():
    tree = RadixTree()
    h = block_hash(tree.root.hash, (1, 2), 0)
    a = tree.add(tree.root, h, (1, 2), block=5, on_gpu=True, priority=35, last_access=0)
    assert tree.lookup(tree.root, h, (1, 2)) is a
    assert tree.lookup(tree.root, h, (1, 3)) is None  # a colliding hash is a miss
    assert tree.lookup(a, h, (1, 2)) is None
    b = tree.add(a, block_hash(h, (3, 4), 0), (3, 4), 6, True, 35, 0)
    assert a.gpu_children == 1 and b.depth == 2 and len(tree) == 2
    with pytest.raises(ValueError, match="already"):
        tree.add(tree.root, h, (1, 2), 7, True, 35, 0)
    with pytest.raises(ValueError, match="leaf"):
        tree.remove(a)
    tree.move(b, on_gpu=False, block=0)
    assert a.gpu_children == 0 and not b.on_gpu
    with pytest.raises(ValueError, match="host"):
        tree.add(b, 123, (5, 6), 8, True, 35, 0)
    tree.remove(b)
    tree.remove(a)
    assert len(tree) == 0 and not tree.root.children


def make(num_blocks: int, **kv) -> KVCacheManager:
    return KVCacheManager(KVConfig(tokens_per_block=TPB, **kv), num_blocks)


def step(mgr: KVCacheManager, **parts):
    result = mgr.step(KVStep(iteration=next(_iteration), **parts))
    mgr.check_invariants()
    return result


def cache_prompt(mgr: KVCacheManager, rid: str, tokens: list[int], priority: int = 35) -> None:
    adm = KVAdmit(request_id=rid, token_ids=tokens, reserve_tokens=len(tokens), priority=priority)
    step(mgr, admit=[adm])
    step(mgr, computed=[KVComputed(rid, len(tokens))])
    step(mgr, free=[KVFree(rid)])


def cached_blocks(mgr: KVCacheManager, tokens: list[int]) -> int:
    return mgr.match_prefix(tokens + [-1]) // TPB


def test_longest_prefix_in_whole_blocks():
    mgr = make(17)
    cache_prompt(mgr, "a", list(range(12)))
    assert cached_blocks(mgr, list(range(12))) == 3
    assert cached_blocks(mgr, list(range(10))) == 2  # a partial block never matches
    assert cached_blocks(mgr, list(range(8)) + [0, 0, 0, 0]) == 2
    assert cached_blocks(mgr, [99] + list(range(1, 12))) == 0


def test_eviction_takes_lowest_priority_first():
    mgr = make(17)
    low, mid, high = [100, 101, 102, 103], [200, 201, 202, 203], [300, 301, 302, 303]
    cache_prompt(mgr, "high", high, priority=80)
    cache_prompt(mgr, "low", low, priority=10)  # most recent, but lowest priority
    cache_prompt(mgr, "mid", mid, priority=35)
    assert mgr.evict(1) == 1
    assert [cached_blocks(mgr, p) for p in (low, mid, high)] == [0, 1, 1]
    mgr.evict(1)
    assert [cached_blocks(mgr, p) for p in (low, mid, high)] == [0, 0, 1]


def test_eviction_takes_least_recently_used_within_a_priority():
    mgr = make(17)
    first, second = [1, 1, 1, 1], [2, 2, 2, 2]
    cache_prompt(mgr, "first", first)
    cache_prompt(mgr, "second", second)
    cache_prompt(mgr, "again", first + [5])  # touches `first` again
    mgr.evict(1)
    assert cached_blocks(mgr, second) == 0 and cached_blocks(mgr, first) == 1


def test_only_leaves_are_evicted_deepest_first():
    mgr = make(17)
    prompt = list(range(16))
    cache_prompt(mgr, "a", prompt)
    for expected in (3, 2, 1, 0):
        mgr.evict(1)
        assert cached_blocks(mgr, prompt) == expected
        mgr.check_invariants()


def test_blocks_under_a_running_request_are_not_evicted():
    mgr = make(17)
    shared = list(range(8))
    cache_prompt(mgr, "idle", shared + [50, 51, 52, 53])
    step(mgr, admit=[KVAdmit(request_id="run", token_ids=shared + [60], reserve_tokens=9)])
    assert mgr.evict(10) == 1  # only the idle branch's own block
    assert cached_blocks(mgr, shared) == 2
    assert cached_blocks(mgr, shared + [50, 51, 52, 53]) == 2


def test_shared_ancestor_is_evicted_after_all_its_branches():
    mgr = make(17)
    root_block = [7, 7, 7, 7]
    cache_prompt(mgr, "x", root_block + [1, 1, 1, 1], priority=10)
    cache_prompt(mgr, "y", root_block + [2, 2, 2, 2], priority=90)
    mgr.evict(1)  # x's leaf (low priority); the shared block still has y's leaf
    assert cached_blocks(mgr, root_block + [1, 1, 1, 1]) == 1
    mgr.evict(1)  # the shared block is not a leaf yet: y's leaf goes
    assert cached_blocks(mgr, root_block + [2, 2, 2, 2]) == 1
    mgr.evict(1)
    assert cached_blocks(mgr, root_block) == 0


def test_a_hash_collision_is_a_miss_and_stops_caching(monkeypatch):
    import greenroom.kv.admission as admission
    import greenroom.kv.manager as manager
    import greenroom.kv.request_blocks as request_blocks

    colliding = {(5, 5, 5, 5), (6, 6, 6, 6)}

    def weak_hash(parent: int, tokens: tuple[int, ...], extra: int) -> int:
        return 4242 if tokens in colliding else block_hash(parent, tokens, extra)

    for module in (admission, manager, request_blocks):
        monkeypatch.setattr(module, "block_hash", weak_hash)
    mgr = make(17)
    cache_prompt(mgr, "five", [5, 5, 5, 5])
    (six,) = step(
        mgr, admit=[KVAdmit(request_id="six", token_ids=[6] * 4 + [1] * 5, reserve_tokens=9)]
    ).admitted
    assert six.num_cached_tokens == 0  # same key, other tokens: never a wrong prefix
    step(mgr, computed=[KVComputed("six", 9)])
    assert mgr.requests["six"].sealed and mgr.requests["six"].nodes == []
    step(mgr, free=[KVFree("six")])
    assert mgr.match_prefix([6] * 4 + [1] * 5) == 0
    assert mgr.match_prefix([5, 5, 5, 5, 0]) == 4
    assert mgr.num_free_blocks == 16
