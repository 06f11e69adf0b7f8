"""Property tests of the mixed flow: random arrivals, prompt lengths, budgets and pool sizes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduling_sim import Sim, mixed

request = st.tuples(
    st.integers(0, 6),  # arrival round
    st.integers(1, 30),  # prompt length
    st.integers(1, 16),  # max_tokens
    st.integers(0, 3),  # which shared prefix (0: none)
    st.booleans(),  # ignore_eos
    st.one_of(st.none(), st.none(), st.none(), st.integers(0, 30)),  # cancel at this round
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request, min_size=3, max_size=12),
    max_num_tokens=st.integers(1, 48),
    max_batch_size=st.integers(1, 6),
    num_blocks=st.integers(8, 32),
    policy=st.sampled_from(["max_utilization", "guaranteed_no_evict"]),
    in_flight=st.integers(1, 3),
    cap=st.integers(1, 8),
)
def test_budgets_hold_and_outputs_match_under_random_load(
    requests, max_num_tokens, max_batch_size, num_blocks, policy, in_flight, cap
):
    sim = Sim(
        mixed(max_num_tokens, max_batch_size),
        num_blocks=num_blocks,
        vocab=24,
        max_model_len=64,
        capacity_policy=policy,
        plans_in_flight=in_flight,
        max_num_active_requests=cap,
    )
    usable = (num_blocks - 1) * 4
    prefixes = {k: [40 + k] * (4 * k + 3) for k in range(4)}
    arrivals, cancels = {}, {}
    for i, (at, n, m, k, ign, cancel_at) in enumerate(requests):
        tokens = (prefixes[k] if k else []) + [1 + (i * 13 + j * 5) % 30 for j in range(n)]
        tokens = tokens[: 60 - m]
        if len(tokens) + m > usable:
            continue  # could never fit in the pool; covered by its own test
        arrivals.setdefault(at, []).append((f"r{i}", tokens, m, ign))
        if cancel_at is not None:
            cancels.setdefault(cancel_at, []).append(f"r{i}")
    cancelled = set()
    for rnd in range(10_000):
        for rid, tokens, m, ign in arrivals.pop(rnd, []):
            sim.submit(rid, tokens, max_tokens=m, ignore_eos=ign)
        for rid in cancels.pop(rnd, []):
            if rid in sim.prompts and rid not in sim.final:
                cancelled.add(rid)
                sim.cancel([rid])
        moved = sim.iterate("mixed")
        sim.check()
        if not moved and not arrivals and not cancels:
            break
    for p in sim.plans:
        assert sum(s.num_tokens for s in p.steps) <= max_num_tokens
        assert len(p.steps) <= max_batch_size
        assert len({s.request_id for s in p.steps}) == len(p.steps)
    for rid in sim.prompts:
        expected, reason = sim.expected(rid)
        if rid in cancelled:
            assert sim.final[rid] == "abort"
            assert sim.tokens[rid] == expected[: len(sim.tokens[rid])]
        else:
            assert (sim.tokens[rid], sim.final[rid]) == (expected, reason), rid
    # each admission sends its prompt once; later steps carry no prompt
    news = [n.request_id for p in sim.plans for n in p.new]
    preemptions = sim.core.stats().get("preemptions", 0)
    assert len(news) <= len(set(news)) + preemptions
    if policy == "guaranteed_no_evict":
        assert preemptions == 0
    sim.drained()
