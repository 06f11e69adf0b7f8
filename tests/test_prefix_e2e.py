"""Prefix reuse end to end: real nodes on the embedded tiny model, the client over loopback tcp.

Requests that share a prompt prefix must produce the same greedy tokens as a node without
reuse, while their final metrics (and the node's KVStats) show the reuse: GPU blocks found in
the prefix tree, or blocks offloaded to the host tier and onboarded again.
"""

from __future__ import annotations

import asyncio

import pytest

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, GenerationResult
from greenroom.config import load_config
from greenroom.node import Node

pytestmark = pytest.mark.slow

TPB = 16
MAX_TOKENS = 8


def synthetic(seed: int, n: int) -> list[int]:
    """n token ids in [3, 500) of the tiny vocabulary, different for each seed."""
    return [(seed * 7919 + i * 131 + (i * i) % 97) % 497 + 3 for i in range(n)]


PREFIX_1 = synthetic(1, 20 * TPB)  # 20 full blocks
PREFIX_2 = synthetic(2, 20 * TPB)
SUFFIX_A = synthetic(3, 21)
SUFFIX_B = synthetic(4, 13)


def node_config(**overrides):
    base = {
        "port": 0,
        "kv.num_blocks": 256,
        "kv.tokens_per_block": TPB,
        "scheduler.max_num_tokens": 64,  # prompts prefill over several chunks
        "log_level": "warning",
    }
    base.update(overrides)
    return load_config(overrides=base)


async def generate_in_order(node: Node, prompts: list[list[int]]) -> list[GenerationResult]:
    """One request at a time, so each finds what the earlier ones left in the cache."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    async with AsyncClient(node.address, timeout=60) as client:
        return [await client.generate(p, sampling) for p in prompts]


async def reference(prompts: list[list[int]]) -> list[list[int]]:
    node = await Node.start(node_config(**{"kv.enable_prefix_reuse": False}))
    try:
        results = await generate_in_order(node, prompts)
        stats = await node.kv_stats()
    finally:
        await node.stop()
    assert stats.hit_blocks == 0 and stats.lookups_blocks == 0
    assert all(r.metrics.reused_blocks == r.metrics.num_cached_tokens == 0 for r in results)
    return [r.token_ids for r in results]


def eligible_blocks(prompt: list[int]) -> int:
    """Prompt blocks a lookup may reuse: whole blocks short of the last prompt token."""
    return (len(prompt) - 1) // TPB


async def test_shared_prefix_reuses_gpu_blocks_with_unchanged_tokens() -> None:
    prompts = [PREFIX_1 + SUFFIX_A, PREFIX_1 + SUFFIX_B, PREFIX_1 + SUFFIX_B]
    expected = await reference(prompts)
    node = await Node.start(node_config())
    try:
        first, second, again = await generate_in_order(node, prompts)
        stats = await node.kv_stats()
        sched = await node.scheduler_stats()
    finally:
        await node.stop()
    assert [first.token_ids, second.token_ids, again.token_ids] == expected
    assert len(set(map(tuple, expected))) > 1  # the suffixes do steer the output

    m = first.metrics
    assert (m.reused_blocks, m.num_cached_tokens) == (0, 0)
    assert m.missed_blocks == eligible_blocks(prompts[0])
    m = second.metrics
    assert m.num_prompt_tokens == len(prompts[1]) and m.num_output_tokens == MAX_TOKENS
    assert (m.reused_blocks, m.onboarded_blocks, m.num_cached_tokens) == (20, 0, 20 * TPB)
    assert m.missed_blocks == eligible_blocks(prompts[1]) - 20
    m = again.metrics  # the same prompt: every eligible block, its own suffix included
    assert m.reused_blocks == eligible_blocks(prompts[2]) and m.missed_blocks == 0
    assert m.num_cached_tokens == m.reused_blocks * TPB

    assert stats.lookups_blocks == sum(eligible_blocks(p) for p in prompts)
    assert stats.hit_blocks == 20 + eligible_blocks(prompts[2])
    assert stats.offloaded_blocks == stats.onboarded_blocks == 0
    assert sched["plans_over_budget"] == 0 and sched["max_plan_tokens"] <= 64
    computed = sum(len(p) for p in prompts) - 20 * TPB - eligible_blocks(prompts[2]) * TPB
    assert sched["prefill_tokens"] == computed


async def test_concurrent_requests_share_a_prefix_safely() -> None:
    prompts = [PREFIX_2 + synthetic(10 + i, 5 + 3 * i) for i in range(6)]
    expected = await reference(prompts)
    node = await Node.start(node_config())
    try:
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        async with AsyncClient(node.address, timeout=60) as client:
            first = await client.generate(prompts[0], sampling)
            rest = await asyncio.gather(*(client.generate(p, sampling) for p in prompts[1:]))
    finally:
        await node.stop()
    results = [first, *rest]
    assert [r.token_ids for r in results] == expected
    assert all(r.metrics.reused_blocks == 20 for r in rest)


async def test_host_tier_offloads_and_onboards_with_unchanged_tokens() -> None:
    # 31 usable GPU blocks: one 22-block request fits, two do not, so the second prompt evicts
    # the first one's cached blocks to the host tier and the third onboards them again
    prompts = [
        PREFIX_1 + SUFFIX_A,
        PREFIX_2 + SUFFIX_A,
        PREFIX_1 + SUFFIX_B,
        PREFIX_2 + SUFFIX_B,
    ]
    expected = await reference(prompts)
    node = await Node.start(node_config(**{"kv.num_blocks": 32, "kv.host_blocks": 64}))
    try:
        results = await generate_in_order(node, prompts)
        stats = await node.kv_stats()
        sched = await node.scheduler_stats()
    finally:
        await node.stop()
    assert [r.token_ids for r in results] == expected

    for r in results[:2]:
        assert r.metrics.reused_blocks == r.metrics.onboarded_blocks == 0
    for r in results[2:]:
        m = r.metrics
        assert m.onboarded_blocks > 0, m
        assert m.reused_blocks + m.onboarded_blocks == 20, m  # the whole shared prefix is found
        assert m.num_cached_tokens == 20 * TPB
    assert stats.host_blocks == 64 and stats.total_blocks == 31
    assert stats.offloaded_blocks > 0
    assert stats.onboarded_blocks == sum(r.metrics.onboarded_blocks for r in results)
    assert stats.hit_blocks == 40
    assert sched["plans_over_budget"] == 0 and sched.get("preemptions", 0) == 0


async def test_without_host_tier_the_evicted_prefix_is_recomputed() -> None:
    prompts = [PREFIX_1 + SUFFIX_A, PREFIX_2 + SUFFIX_A, PREFIX_1 + SUFFIX_B]
    node = await Node.start(node_config(**{"kv.num_blocks": 32}))
    try:
        results = await generate_in_order(node, prompts)
        stats = await node.kv_stats()
    finally:
        await node.stop()
    m = results[2].metrics
    assert m.onboarded_blocks == 0 and m.reused_blocks < 20 and m.missed_blocks > 0
    assert stats.offloaded_blocks == stats.onboarded_blocks == 0 and stats.host_blocks == 0
