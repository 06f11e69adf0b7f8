"""Host tier: offload on eviction, onboard on match, host eviction, copy order, events."""

from __future__ import annotations

from itertools import count

from greenroom.bus.messages import BlockCopy, KVAdmit, KVComputed, KVEvent, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager

TPB = 2
_iteration = count()


class Engine:
    """Stand-in for the engine's KV tensors: the token ids each block's KV was computed for."""

    def __init__(self) -> None:
        self.gpu: dict[int, tuple[int, ...]] = {}
        self.host: dict[int, tuple[int, ...]] = {}

    def run(self, copies: list[BlockCopy]) -> None:
        for c in copies:
            if c.kind == "offload":
                self.host[c.dst] = self.gpu[c.src]
            else:
                assert c.kind == "onboard"
                self.gpu[c.dst] = self.host[c.src]


class Rig:
    def __init__(self, num_blocks: int, host_blocks: int, **kv) -> None:
        self.events: list[KVEvent] = []
        cfg = KVConfig(tokens_per_block=TPB, host_blocks=host_blocks, **kv)
        self.mgr = KVCacheManager(cfg, num_blocks, event_sink=self.events.append)
        self.engine = Engine()
        self.copies: list[BlockCopy] = []

    def step(self, **parts):
        res = self.mgr.step(KVStep(iteration=next(_iteration), **parts))
        self.mgr.check_invariants()
        self.engine.run(res.copies)
        self.copies.extend(res.copies)
        return res

    def admit(self, rid: str, tokens: list[int], reserve: int = 0, priority: int = 35):
        adm = KVAdmit(
            request_id=rid,
            token_ids=tokens,
            reserve_tokens=reserve or len(tokens),
            priority=priority,
        )
        res = self.step(admit=[adm])
        for a in res.admitted:  # the reused prefix must hold exactly the prompt's tokens
            for i in range(a.num_cached_tokens // TPB):
                assert self.engine.gpu[a.block_ids[i]] == tuple(tokens[i * TPB : (i + 1) * TPB])
        return res

    def compute(self, rid: str, tokens: list[int]) -> None:
        """Write the KV of every full block (what a prefill does), then report it."""
        blocks = self.mgr.blocks_of(rid)
        for i in range(len(tokens) // TPB):
            self.engine.gpu[blocks[i]] = tuple(tokens[i * TPB : (i + 1) * TPB])
        self.step(computed=[KVComputed(rid, len(tokens))])

    def cache(self, rid: str, tokens: list[int], priority: int = 35) -> None:
        self.admit(rid, tokens, priority=priority)
        self.compute(rid, tokens)
        self.step(free=[KVFree(rid)])

    def evict(self, n: int) -> None:
        self.mgr.evict(n)
        self.step()


def test_eviction_offloads_and_a_match_onboards():
    rig = Rig(num_blocks=5, host_blocks=4)
    prompt = [1, 2, 3, 4, 5, 6]
    rig.cache("a", prompt)
    rig.evict(3)
    assert [c.kind for c in rig.copies] == ["offload"] * 3
    assert sorted(rig.engine.host.values()) == [(1, 2), (3, 4), (5, 6)]
    assert [(e.kind, e.tier, len(e.block_hashes)) for e in rig.events[-1:]] == [
        ("offloaded", "host", 3)
    ]
    assert rig.mgr.num_free_blocks == 4 and rig.mgr.stats().free_host_blocks == 1
    assert rig.mgr.match_prefix(prompt + [7]) == 6  # still matchable, from the host
    rig.copies.clear()
    (b,) = rig.admit("b", prompt + [7], reserve=8).admitted
    assert (b.num_cached_tokens, b.onboarded_blocks, b.reused_blocks, b.new_blocks) == (6, 3, 0, 1)
    assert [c.kind for c in rig.copies] == ["onboard"] * 3
    assert [c.dst for c in rig.copies] == b.block_ids[:3]
    stats = rig.mgr.stats()
    assert (stats.offloaded_blocks, stats.onboarded_blocks, stats.free_host_blocks) == (3, 3, 4)
    assert rig.events[-1].kind == "onboarded" and len(rig.events[-1].block_hashes) == 3


def test_low_priority_blocks_are_dropped_not_offloaded():
    rig = Rig(num_blocks=5, host_blocks=4, offload_min_priority=50)
    rig.cache("low", [1, 2, 3, 4], priority=20)
    rig.cache("high", [5, 6, 7, 8], priority=60)
    rig.evict(4)
    assert [c.kind for c in rig.copies] == ["offload", "offload"]
    assert rig.mgr.match_prefix([1, 2, 3, 4, 0]) == 0
    assert rig.mgr.match_prefix([5, 6, 7, 8, 0]) == 4
    assert {(e.kind, e.tier) for e in rig.events} >= {("removed", "gpu"), ("offloaded", "host")}


def test_host_tier_off_drops_evicted_blocks():
    rig = Rig(num_blocks=5, host_blocks=0)
    rig.cache("a", [1, 2, 3, 4])
    rig.evict(2)
    assert rig.copies == [] and rig.mgr.match_prefix([1, 2, 3, 4, 5]) == 0


def test_full_host_tier_evicts_its_own_lowest_priority_leaf():
    rig = Rig(num_blocks=3, host_blocks=2)
    rig.cache("keep", [1, 1, 2, 2], priority=90)
    rig.evict(2)  # both blocks to the host tier, which is now full
    rig.cache("new", [3, 3], priority=40)
    rig.evict(1)  # the host tier makes room: "keep"'s leaf goes (a leaf, though higher priority)
    assert rig.mgr.match_prefix([3, 3, 0]) == 2
    assert rig.mgr.match_prefix([1, 1, 2, 2, 0]) == 2
    assert ("removed", "host") in {(e.kind, e.tier) for e in rig.events}
    # the host block freed by the removal (keep's leaf, offloaded first) takes the new offload
    assert rig.copies[-1] == BlockCopy("offload", rig.copies[-1].src, rig.copies[0].dst)


def test_onboard_that_evicts_orders_the_offload_first():
    rig = Rig(num_blocks=3, host_blocks=2)  # 2 GPU blocks
    rig.cache("a", [1, 1])
    rig.evict(1)  # a's block on the host
    rig.cache("b", [2, 2])
    rig.cache("c", [3, 3])  # GPU full of idle cached blocks b and c
    rig.copies.clear()
    (a2,) = rig.admit("a2", [1, 1, 9]).admitted  # onboard a + 1 new block: evicts b and c
    assert (a2.onboarded_blocks, a2.new_blocks) == (1, 1)
    offload_b, onboard_a, offload_c = rig.copies
    assert [c.kind for c in rig.copies] == ["offload", "onboard", "offload"]
    assert offload_b.src == onboard_a.dst  # b's block is saved before a is copied into it
    assert offload_c.dst == onboard_a.src  # a's host block is rewritten only after it was read
    assert rig.mgr.match_prefix([2, 2, 0]) == rig.mgr.match_prefix([3, 3, 0]) == 2
    rig.step(free=[KVFree("a2")])
    for rid, tokens in (("b2", [2, 2, 9]), ("c2", [3, 3, 9])):
        (got,) = rig.admit(rid, tokens).admitted  # the Rig checks the onboarded KV
        assert got.onboarded_blocks == 1
        rig.step(free=[KVFree(rid)])


def test_host_block_is_reused_only_after_its_onboard():
    rig = Rig(num_blocks=3, host_blocks=1)  # 2 GPU blocks, 1 host block
    rig.cache("a", [1, 1])
    rig.evict(1)  # a on the only host block
    rig.cache("b", [2, 2])
    rig.copies.clear()
    # a2 needs a's block onboarded plus one new block: the new one evicts b, whose offload
    # can only use the host block a's onboard has just read
    (a2,) = rig.admit("a2", [1, 1, 7], reserve=4).admitted
    assert a2.onboarded_blocks == 1 and a2.new_blocks == 1
    assert [c.kind for c in rig.copies] == ["onboard", "offload"]
    assert rig.copies[0].src == rig.copies[1].dst
    rig.step(free=[KVFree("a2")])
    rig.evict(1)
    rig.admit("b2", [2, 2, 7])  # b's KV survived on the host


def test_dropping_a_gpu_block_drops_its_host_descendants():
    rig = Rig(num_blocks=4, host_blocks=1, offload_min_priority=50)
    prompt = [1, 1, 2, 2, 3, 3]
    rig.cache("a", prompt, priority=60)
    rig.evict(1)  # leaf to the host tier (full now)
    tree = rig.mgr.cache.tree
    leaf_parent = [n for n in tree.nodes() if n.depth == 2][0]
    leaf_parent.priority = 10  # next eviction cannot offload it
    rig.evict(1)
    assert rig.mgr.match_prefix(prompt + [0]) == 2
    assert rig.mgr.stats().free_host_blocks == 1
    kinds = [(e.kind, e.tier) for e in rig.events]
    assert kinds[-2:] == [("removed", "host"), ("removed", "gpu")]  # the leaf goes first


def test_recomputing_a_host_block_moves_it_back_without_a_copy():
    rig = Rig(num_blocks=5, host_blocks=2)
    prompt = [1, 1, 2, 2]
    rig.admit("a", prompt)
    rig.admit("b", prompt)  # both miss: each computes the blocks itself
    rig.compute("a", prompt)
    rig.step(free=[KVFree("a")])
    rig.evict(2)  # a's cached blocks go to the host; b still holds its private copies
    rig.copies.clear()
    rig.compute("b", prompt)
    assert rig.copies == []  # the host nodes take b's GPU blocks: nothing to copy
    assert rig.mgr.stats().free_host_blocks == 2
    assert rig.events[-1].kind == "onboarded" and len(rig.events[-1].block_hashes) == 2
    rig.step(free=[KVFree("b")])
    (c,) = rig.admit("c", prompt + [3]).admitted
    assert (c.reused_blocks, c.onboarded_blocks) == (2, 0)
