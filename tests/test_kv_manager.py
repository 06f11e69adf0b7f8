"""KVCacheManager step semantics: free, computed, extend, admit; statistics and events."""

from __future__ import annotations

from itertools import count

import pytest

from greenroom.bus.messages import (
    KVAdmit,
    KVComputed,
    KVEvent,
    KVExtend,
    KVFree,
    KVStep,
    KVStepResult,
)
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager

TPB = 4
_iteration = count()


def make(num_blocks: int = 17, events: list[KVEvent] | None = None, **kv) -> KVCacheManager:
    sink = events.append if events is not None else None
    return KVCacheManager(KVConfig(tokens_per_block=TPB, **kv), num_blocks, event_sink=sink)


def step(mgr: KVCacheManager, **parts) -> KVStepResult:
    result = mgr.step(KVStep(iteration=next(_iteration), **parts))
    mgr.check_invariants()
    return result


def admit(rid: str, tokens: list[int], reserve: int | None = None, **kw) -> KVAdmit:
    return KVAdmit(request_id=rid, token_ids=tokens, reserve_tokens=reserve or len(tokens), **kw)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def cache_prompt(mgr: KVCacheManager, rid: str, tokens: list[int], **kw) -> None:
    """Admit, compute and finish a request so its full blocks end up cached."""
    step(mgr, admit=[admit(rid, tokens, **kw)])
    step(mgr, computed=[KVComputed(rid, len(tokens))])
    step(mgr, free=[KVFree(rid)])


def test_admit_allocates_reserve_blocks_and_counts_misses():
    mgr = make()
    res = step(mgr, admit=[admit("a", toks(0, 10), reserve=20)])
    (a,) = res.admitted
    assert len(a.block_ids) == 5 and len(set(a.block_ids)) == 5 and 0 not in a.block_ids
    assert (a.num_cached_tokens, a.reused_blocks, a.new_blocks, a.missed_blocks) == (0, 0, 5, 2)
    assert res.free_blocks == mgr.num_free_blocks == 11 and res.total_blocks == 16
    assert mgr.holds("a") and mgr.blocks_of("a") == a.block_ids


def test_blocks_become_matchable_only_once_computed():
    mgr = make()
    prompt = toks(0, 13)
    step(mgr, admit=[admit("a", prompt)])
    assert mgr.match_prefix(prompt) == 0
    step(mgr, computed=[KVComputed("a", 6)])  # one full block
    assert mgr.match_prefix(prompt) == 4
    (b,) = step(mgr, admit=[admit("b", prompt)]).admitted
    assert b.num_cached_tokens == 4 and b.reused_blocks == 1 and b.missed_blocks == 2
    assert b.block_ids[0] == mgr.blocks_of("a")[0]
    assert b.block_ids[1] != mgr.blocks_of("a")[1]  # a's second block is still being written


def test_last_prompt_token_is_always_recomputed():
    mgr = make()
    cache_prompt(mgr, "a", toks(0, 12))  # three full blocks cached
    (b,) = step(mgr, admit=[admit("b", toks(0, 12))]).admitted
    assert b.num_cached_tokens == 8  # block 3 holds the last token: a fresh block instead
    assert (b.reused_blocks, b.new_blocks, b.missed_blocks) == (2, 1, 0)
    (c,) = step(mgr, admit=[admit("c", toks(0, 13))]).admitted
    assert c.num_cached_tokens == 12 and c.reused_blocks == 3


def test_free_is_idempotent_and_unknown_ids_are_ignored():
    mgr = make()
    step(mgr, admit=[admit("a", toks(0, 8))])
    before = mgr.num_free_blocks
    step(mgr, free=[KVFree("a"), KVFree("a"), KVFree("nobody")])
    assert not mgr.holds("a") and mgr.blocks_of("a") == []
    assert mgr.num_free_blocks == before + 2


def test_free_caches_outputs_but_not_the_last_sampled_token():
    mgr = make()
    prompt = toks(0, 6)
    step(mgr, admit=[admit("a", prompt, reserve=12)])
    # outputs 100..105: tokens 0..10 have KV, token 11 (the last sampled) does not
    step(mgr, free=[KVFree("a", [100, 101, 102, 103, 104, 105])])
    full = prompt + [100, 101, 102, 103, 104, 105]
    assert mgr.match_prefix(full + [7]) == 8
    assert mgr.match_prefix(full[:9]) == 8


def test_abort_mid_prefill_caches_only_computed_blocks():
    mgr = make()
    step(mgr, admit=[admit("a", toks(0, 16))])
    step(mgr, computed=[KVComputed("a", 5)])
    step(mgr, free=[KVFree("a")])
    assert mgr.match_prefix(toks(0, 16)) == 4


def test_same_prefix_computed_twice_keeps_the_first_and_pins_it():
    mgr = make(num_blocks=9)
    prompt = toks(0, 9)
    res = step(mgr, admit=[admit("a", prompt), admit("b", prompt)])
    a, b = res.admitted
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    step(mgr, computed=[KVComputed("a", 9), KVComputed("b", 9)])
    step(mgr, free=[KVFree("a")])
    # b holds its own private copies plus a pin on a's cached blocks: they cannot be evicted
    assert mgr.num_free_blocks == 8 - 3 - 2
    (c,) = step(mgr, admit=[admit("c", prompt)]).admitted
    assert c.block_ids[:2] == a.block_ids[:2]
    step(mgr, free=[KVFree("b"), KVFree("c")])
    assert mgr.num_free_blocks == 8


def test_extend_grows_or_fails_without_side_effects():
    mgr = make(num_blocks=6)  # 5 usable
    step(mgr, admit=[admit("a", toks(0, 4)), admit("b", toks(50, 4))])
    res = step(mgr, extend=[KVExtend("a", 9), KVExtend("b", 4), KVExtend("ghost", 4)])
    assert len(res.extended["a"]) == 2 and "b" not in res.extended
    assert res.failed_extend == ["ghost"]
    assert mgr.blocks_of("a")[1:] == res.extended["a"]
    held = mgr.blocks_of("b")
    res = step(mgr, extend=[KVExtend("b", 12)])
    assert res.failed_extend == ["b"] and res.extended == {}
    assert mgr.blocks_of("b") == held and mgr.num_free_blocks == 1


def test_extend_evicts_idle_cached_blocks():
    mgr = make(num_blocks=5)  # 4 usable
    cache_prompt(mgr, "a", toks(0, 12))
    step(mgr, admit=[admit("b", toks(50, 4))])
    assert mgr.num_free_blocks == 3
    res = step(mgr, extend=[KVExtend("b", 16)])
    assert len(res.extended["b"]) == 3 and mgr.num_free_blocks == 0
    assert mgr.match_prefix(toks(0, 13)) == 0


def test_batch_admission_is_first_come_first_served():
    mgr = make(num_blocks=9)  # 8 usable
    cache_prompt(mgr, "warm", toks(0, 8))
    batch = [
        admit("a", toks(0, 9)),  # reuses 2, needs 1 more
        admit("b", toks(100, 40)),  # needs 10: no room
        admit("c", toks(0, 9)),  # would fit, but comes after b
    ]
    res = step(mgr, admit=batch)
    assert [x.request_id for x in res.admitted] == ["a"]
    assert res.rejected == ["b", "c"]
    assert not mgr.holds("b") and not mgr.holds("c")
    assert res.admitted[0].reused_blocks == 2
    assert mgr.num_free_blocks == 8 - 3


def test_statistics_are_per_request_within_a_batch():
    mgr = make(num_blocks=33)
    cache_prompt(mgr, "warm", toks(0, 12))
    res = step(
        mgr,
        admit=[
            admit("hit", toks(0, 13), reserve=16),
            admit("half", toks(0, 4) + toks(200, 9)),
            admit("miss", toks(300, 9)),
        ],
    )
    by_id = {x.request_id: x for x in res.admitted}
    assert (by_id["hit"].reused_blocks, by_id["hit"].new_blocks, by_id["hit"].missed_blocks) == (
        3,
        1,
        0,
    )
    assert (by_id["half"].reused_blocks, by_id["half"].missed_blocks) == (1, 2)
    assert (by_id["miss"].reused_blocks, by_id["miss"].missed_blocks) == (0, 2)
    stats = mgr.stats()
    assert stats.lookups_blocks == 2 + 3 + 3 + 2  # the warm-up admit looked up 2 blocks
    assert stats.hit_blocks == 4


def test_cache_salt_separates_prefixes():
    mgr = make()
    cache_prompt(mgr, "a", toks(0, 8), cache_salt="tenant-1")
    assert mgr.match_prefix(toks(0, 9), "tenant-1") == 8
    assert mgr.match_prefix(toks(0, 9), "tenant-2") == 0
    assert mgr.match_prefix(toks(0, 9)) == 0


def test_prefix_reuse_off_shares_nothing():
    events: list[KVEvent] = []
    mgr = make(events=events, enable_prefix_reuse=False, host_blocks=4)
    cache_prompt(mgr, "a", toks(0, 8))
    (b,) = step(mgr, admit=[admit("b", toks(0, 9))]).admitted
    assert b.num_cached_tokens == 0 and b.missed_blocks == 0
    assert events == [] and mgr.stats().host_blocks == 0


def test_events_are_merged_per_step_and_report_removal():
    events: list[KVEvent] = []
    mgr = make(num_blocks=4, events=events)  # 3 usable
    step(mgr, admit=[admit("a", toks(0, 12))])
    step(mgr, computed=[KVComputed("a", 12)])
    step(mgr, free=[KVFree("a")])
    assert [(e.kind, e.tier, len(e.block_hashes)) for e in events] == [("stored", "gpu", 3)]
    stored = events[0].block_hashes
    events.clear()
    step(mgr, admit=[admit("b", toks(100, 8))])
    assert [(e.kind, e.tier) for e in events] == [("removed", "gpu")]
    assert events[0].block_hashes == [stored[2], stored[1]]  # leaves first


def test_free_then_admit_in_one_step_reuses_the_freed_blocks():
    mgr = make(num_blocks=5)  # 4 usable
    step(mgr, admit=[admit("a", toks(0, 12), reserve=16)])
    assert mgr.num_free_blocks == 0
    res = step(mgr, free=[KVFree("a", [7])], admit=[admit("b", toks(0, 12) + [7, 8])])
    (b,) = res.admitted
    assert b.num_cached_tokens == 12 and b.reused_blocks == 3 and b.new_blocks == 1


def test_step_applies_free_before_computed():
    mgr = make()
    step(mgr, admit=[admit("a", toks(0, 12))])
    step(mgr, free=[KVFree("a")], computed=[KVComputed("a", 12)])
    assert mgr.match_prefix(toks(0, 13)) == 0 and mgr.num_free_blocks == 16


def test_admitting_a_held_request_again_is_an_error():
    mgr = make()
    step(mgr, admit=[admit("a", toks(0, 4))])
    with pytest.raises(ValueError, match="twice"):
        mgr.step(KVStep(iteration=0, admit=[admit("a", toks(0, 4))]))
    with pytest.raises(ValueError, match="twice"):
        mgr.step(KVStep(iteration=0, admit=[admit("x", toks(0, 4)), admit("x", toks(0, 4))]))
    mgr.check_invariants()


def test_result_block_lists_are_not_shared_with_manager_state():
    mgr = make()
    (a,) = step(mgr, admit=[admit("a", toks(0, 4))]).admitted
    a.block_ids.append(99)
    step(mgr, extend=[KVExtend("a", 8)])
    assert 99 not in mgr.blocks_of("a") and len(mgr.blocks_of("a")) == 2


def test_drop_cache_forgets_cached_blocks_on_both_tiers_before_admits():
    mgr = make(num_blocks=9, host_blocks=8)
    cache_prompt(mgr, "a", toks(0, 12))
    cache_prompt(mgr, "b", toks(100, 12))  # pushes some of "a" to the host tier
    step(mgr, admit=[admit("x", toks(200, 28))])  # evicts to host
    step(mgr, free=[KVFree("x")])
    assert mgr.match_prefix(toks(0, 13)) > 0 or mgr.match_prefix(toks(100, 13)) > 0
    held = step(mgr, admit=[admit("h", toks(300, 8))]).admitted[0]
    res = step(mgr, drop_cache=True, admit=[admit("a2", toks(0, 13))])
    assert res.admitted[0].num_cached_tokens == 0 and not res.copies
    assert mgr.match_prefix(toks(100, 13)) == 0
    assert mgr.blocks_of("h") == held.block_ids  # blocks a request holds stay its own
    assert mgr.stats().free_host_blocks == 8


def test_helix_blocks_round_robin_and_room_is_counted_per_rank():
    from greenroom.kv.helix_placement import HelixPlacement

    cfg = KVConfig(tokens_per_block=2)
    mgr = KVCacheManager(cfg, 3 * 4, cp_size=3)  # 3 ranks of 4 blocks (3 usable each)
    placement = HelixPlacement(cp_size=3, tokens_per_block=2)
    assert mgr.stats().rank_used_blocks == [0, 0, 0]
    res = mgr.step(KVStep(iteration=0, admit=[admit("a", [1, 2, 3, 4, 5])]))
    blocks = res.admitted[0].block_ids
    assert [b // 4 for b in blocks] == [placement.block_rank(j) for j in range(3)]
    assert mgr.stats().rank_used_blocks == [1, 1, 1]
    # 7 blocks: rank 0 would need 3 of them but "a" already holds one there
    res = mgr.step(KVStep(iteration=1, admit=[admit("b", [9] * 13, 14)]))
    assert res.rejected == ["b"]
    res = mgr.step(KVStep(iteration=2, extend=[KVExtend("a", 12)]))
    assert [b // 4 for b in res.extended["a"]] == [0, 1, 2]
    mgr.check_invariants()
    assert mgr.stats().rank_used_blocks == [2, 2, 2]
    mgr.step(KVStep(iteration=3, free=[KVFree("a", [6])]))
    assert mgr.stats().rank_used_blocks == [0, 0, 0]  # its cached blocks are idle
    # the cached prefix blocks stay on their ranks when a new request reuses them
    res = mgr.step(KVStep(iteration=4, admit=[admit("c", [1, 2, 3, 4, 5, 6, 7], 8)]))
    adm = res.admitted[0]
    assert adm.block_ids[:2] == blocks[:2] and adm.num_cached_tokens == 4
    assert [b // 4 for b in adm.block_ids] == [0, 1, 2, 0]
    mgr.check_invariants()


def test_helix_host_tier_keeps_each_block_on_its_rank():
    """kv.host_blocks per CP rank: a GPU block goes to a host block of its own rank and comes
    back to a GPU block of that rank (block j of a prefix always on rank j mod cp)."""
    cfg = KVConfig(tokens_per_block=2, host_blocks=2)
    mgr = KVCacheManager(cfg, 2 * 3, cp_size=2)  # 2 ranks of 3 GPU blocks (2 usable each)
    assert mgr.stats().host_blocks == 4  # 2 per rank: host id = rank * 2 + local id
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    step(mgr, admit=[admit("a", a)])
    step(mgr, computed=[KVComputed("a", len(a))])
    step(mgr, free=[KVFree("a")])  # its 4 full blocks stay cached
    res = step(mgr, admit=[admit("b", [50 + i for i in range(8)])])  # evicts all of them
    assert len(res.copies) == 4
    for c in res.copies:
        assert c.kind == "offload" and c.src // 3 == c.dst // 2
    step(mgr, free=[KVFree("b")])
    res = step(mgr, admit=[admit("c", a)])
    onboards = [c for c in res.copies if c.kind == "onboard"]
    assert onboards and all(c.src // 2 == c.dst // 3 for c in onboards)
    blocks = res.admitted[0].block_ids
    assert [b // 3 for b in blocks] == [j % 2 for j in range(len(blocks))]
