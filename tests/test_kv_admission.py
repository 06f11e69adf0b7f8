"""Two-phase batch admission: the regression for per-request admission, and claim release.

The failure: request A's prefix sits on the host tier and B's prefix is an idle GPU block.
Admitting A first (phase 1 and phase 2 for A, then for B) lets A's onboarding and allocation
evict B's block, so B gets less reuse than the cache showed when the batch was planned.
Claiming every matched block of the batch before any allocation keeps B's block.
"""

from __future__ import annotations

from itertools import count

from greenroom.bus.messages import BlockCopy, KVAdmit, KVAdmitted, KVComputed, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager

TPB = 4
_iteration = count()
A_PREFIX, B_PREFIX = [1, 1, 1, 1], [2, 2, 2, 2]
FILLERS = ([3, 3, 3, 3], [4, 4, 4, 4])


def step(mgr: KVCacheManager, **parts):
    res = mgr.step(KVStep(iteration=next(_iteration), **parts))
    mgr.check_invariants()
    return res


def cache(mgr: KVCacheManager, rid: str, tokens: list[int], priority: int) -> None:
    adm = KVAdmit(request_id=rid, token_ids=tokens, reserve_tokens=len(tokens), priority=priority)
    step(mgr, admit=[adm])
    step(mgr, computed=[KVComputed(rid, len(tokens))])
    step(mgr, free=[KVFree(rid)])


def build() -> KVCacheManager:
    """5 GPU blocks: B's prefix (priority 10) and two fillers idle, 2 free; A's prefix on host."""
    mgr = KVCacheManager(KVConfig(tokens_per_block=TPB, host_blocks=2), 6)
    cache(mgr, "a0", A_PREFIX, priority=50)
    mgr.evict(1)
    step(mgr)
    cache(mgr, "b0", B_PREFIX, priority=10)
    for i, tokens in enumerate(FILLERS):
        cache(mgr, f"f{i}", tokens, priority=35)
    assert mgr.num_free_blocks == 5 and mgr.cache.gpu.num_free == 2
    return mgr


BATCH = [
    KVAdmit(request_id="A", token_ids=A_PREFIX + [9], reserve_tokens=12),  # onboard 1 + new 2
    KVAdmit(request_id="B", token_ids=B_PREFIX + [9], reserve_tokens=8),  # reuse 1 + new 1
]


def naive_admit(mgr: KVCacheManager, admits: list[KVAdmit]) -> list[KVAdmitted | None]:
    """Per-request admission: phase 1 then phase 2 for one request before the next."""
    out = []
    for admit in admits:
        claim = mgr.admission.claim(admit)
        result = mgr.admission.fulfil(claim)
        if result is None:
            mgr.admission.release(claim)
        out.append(result)
    return out


def test_per_request_admission_loses_the_prefix_promised_to_b():
    mgr = build()
    planned = {a.request_id: mgr.match_prefix(a.token_ids) for a in BATCH}
    assert planned == {"A": 4, "B": 4}
    a, b = naive_admit(mgr, BATCH)
    mgr.check_invariants()
    assert a is not None and a.onboarded_blocks == 1
    assert b is not None
    assert b.num_cached_tokens == 0 and b.missed_blocks == 1  # B's shortfall
    assert b.num_cached_tokens < planned["B"]


def test_two_phase_admission_keeps_every_promised_prefix():
    mgr = build()
    planned = {a.request_id: mgr.match_prefix(a.token_ids) for a in BATCH}
    res = step(mgr, admit=BATCH)
    assert res.rejected == []
    a, b = res.admitted
    assert (a.num_cached_tokens, a.onboarded_blocks, a.new_blocks) == (planned["A"], 1, 2)
    assert (b.num_cached_tokens, b.reused_blocks, b.new_blocks) == (planned["B"], 1, 1)
    assert b.missed_blocks == 0
    # A's blocks came from the free list and the fillers, never from B's claimed block
    assert b.block_ids[0] not in a.block_ids
    onboard = [c for c in res.copies if c.kind == "onboard"]
    assert onboard == [BlockCopy("onboard", onboard[0].src, a.block_ids[0])]


def test_rejected_requests_release_their_claims():
    mgr = build()
    too_big = KVAdmit(request_id="C", token_ids=A_PREFIX + [9], reserve_tokens=40)
    res = step(mgr, admit=[too_big, BATCH[1]])
    assert res.admitted == [] and res.rejected == ["C", "B"]
    assert res.copies == []  # nothing was onboarded for a rejected request
    assert mgr.num_free_blocks == 5 and mgr.stats().free_host_blocks == 1
    # B's block is evictable again and A's prefix is still on the host
    assert mgr.evict(5) == 3
    assert mgr.match_prefix(A_PREFIX + [9]) == 4


def test_two_requests_claiming_one_host_block_onboard_it_once():
    mgr = build()
    twins = [
        KVAdmit(request_id="A1", token_ids=A_PREFIX + [7], reserve_tokens=8),
        KVAdmit(request_id="A2", token_ids=A_PREFIX + [8], reserve_tokens=8),
    ]
    res = step(mgr, admit=twins)
    a1, a2 = res.admitted
    assert (a1.onboarded_blocks, a1.reused_blocks) == (1, 0)
    assert (a2.onboarded_blocks, a2.reused_blocks) == (0, 1)  # counted per request
    assert a1.block_ids[0] == a2.block_ids[0]
    assert [c.kind for c in res.copies].count("onboard") == 1
    assert mgr.stats().onboarded_blocks == 1


def test_a_rejected_twin_keeps_no_reference_to_the_onboarded_block():
    mgr = build()
    res = step(
        mgr,
        admit=[
            KVAdmit(request_id="A1", token_ids=A_PREFIX + [7], reserve_tokens=8),
            KVAdmit(request_id="A2", token_ids=A_PREFIX + [8], reserve_tokens=64),
        ],
    )
    assert [a.request_id for a in res.admitted] == ["A1"] and res.rejected == ["A2"]
    shared = res.admitted[0].block_ids[0]
    assert mgr.cache.gpu.refcounts[shared] == 1
