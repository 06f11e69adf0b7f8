"""Disaggregated serving end to end: router + context node + generation node on the embedded
tiny model, the KV moving through real NIXL (UCX over DRAM), greedy tokens compared with a
mixed node's and transformers'."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from disagg_cluster import TPB, cluster, no_leaks, start, synthetic

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.models.tiny import tiny_llama_dir

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SAMPLING = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
# short (one partial block), a whole number of blocks, several blocks and a partial one
PROMPTS = [synthetic(1, 7), synthetic(2, 2 * TPB), synthetic(3, 3 * TPB + 5), synthetic(4, 61)]


@functools.cache
def hf_greedy(prompts: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = model.generate(
                ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS
            )
            out.append(gen[0, len(p) :].tolist())
    return out


async def mixed_tokens(prompts: list[list[int]]) -> list[list[int]]:
    node = await start("mixed")
    try:
        async with AsyncClient(node.address, timeout=60) as c:
            return [(await c.generate(p, SAMPLING)).token_ids for p in prompts]
    finally:
        await node.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_router_tokens_equal_mixed_node_and_transformers(mode: str) -> None:
    expected = await mixed_tokens(PROMPTS)
    assert expected == hf_greedy(tuple(map(tuple, PROMPTS)))
    async with cluster(mode) as c:
        async with AsyncClient(c.address, timeout=60) as client:
            info = await client.server_info()
            results = await asyncio.gather(*(client.generate(p, SAMPLING) for p in PROMPTS))
            first = [d async for d in client.stream(PROMPTS[0], SAMPLING)]
        assert [r.token_ids for r in results] == expected
        assert all(r.finish_reason == "length" for r in results)
        assert results[2].metrics.num_prompt_tokens == len(PROMPTS[2])
        assert results[2].metrics.num_output_tokens == MAX_TOKENS
        # the first token streams alone, from the context node, before the rest
        assert first[0].token_ids == expected[0][:1] and first[0].finish_reason is None
        assert info.role == "router"
        ctx_stats, gen_stats = await no_leaks(c.context[0], c.generation[0])
    assert ctx_stats.transfers["lease_complete"] == len(PROMPTS) + 1
    assert gen_stats.transfers["receive_complete"] == len(PROMPTS) + 1
    assert ctx_stats.leased_blocks == 0


async def test_prefix_reuse_on_both_sides_keeps_tokens() -> None:
    prefix = synthetic(9, 4 * TPB)
    prompts = [prefix + synthetic(10, 9), prefix + synthetic(11, 21), prefix + synthetic(11, 21)]
    expected = await mixed_tokens(prompts)
    async with cluster("async") as c:
        async with AsyncClient(c.address, timeout=60) as client:
            got = [(await client.generate(p, SAMPLING)).token_ids for p in prompts]
        ctx_stats, gen_stats = await no_leaks(c.context[0], c.generation[0])
    assert got == expected
    # the context node found the prefix cached for the later prompts; so did the generation
    # node, which then read only the blocks it did not hold
    assert ctx_stats.hit_blocks >= 2 * 4
    assert gen_stats.hit_blocks >= 2 * 4


async def test_first_token_can_finish_the_request_on_the_context_node() -> None:
    async with cluster("async") as c:
        async with AsyncClient(c.address, timeout=60) as client:
            one = await client.generate(PROMPTS[1], SamplingParams(max_tokens=1))
        ctx_stats, gen_stats = await no_leaks(c.context[0], c.generation[0])
    assert len(one.token_ids) == 1 and one.finish_reason == "length"
    assert "lease_complete" not in ctx_stats.transfers  # no lease: nothing left to decode
    assert gen_stats.transfers.get("receive_complete", 0) == 0
