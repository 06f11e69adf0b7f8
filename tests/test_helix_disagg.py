"""A context node (cp 1) -> a Helix generation node (cp N) through a router, the KV moving
through real NIXL (UCX over DRAM) into each CP rank's own pool.

The generation node's KV manager places every received prompt block round-robin (block j on
rank j mod cp); each rank reads its own blocks. Greedy tokens equal a mixed cp 1 node's, the
blocks a request holds are spread over the ranks, and nothing leaks on either node.
"""

from __future__ import annotations

import asyncio

import pytest
from disagg_cluster import TPB, no_leaks, start, start_router, synthetic

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.kv.helix_placement import HelixPlacement

pytestmark = pytest.mark.slow

SAMPLING = SamplingParams(max_tokens=10, ignore_eos=True)
# one partial block; a whole number of blocks; 7 blocks (over every rank), a partial one last
PROMPTS = [synthetic(1, 7), synthetic(2, 2 * TPB), synthetic(3, 6 * TPB + 5)]
PREFIX = synthetic(9, 5 * TPB)  # cached on the generation node once the first prompt ran
REUSE = [PREFIX + synthetic(10, 9), PREFIX + synthetic(11, 21)]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    async def mixed() -> list[list[int]]:
        node = await start("mixed")
        try:
            async with AsyncClient(node.address, timeout=60) as c:
                return [(await c.generate(p, SAMPLING)).token_ids for p in PROMPTS + REUSE]
        finally:
            await node.stop()

    return asyncio.run(mixed())


async def spread_while_decoding(client: AsyncClient, gen, prompt: list[int], cp: int) -> None:
    """While a long request decodes on the generation node, its blocks are spread over the CP
    ranks as placement says (the prompt's arrived round-robin, decode blocks continued it)."""
    placement = HelixPlacement(cp, TPB)
    seen = 0
    sampling = SamplingParams(max_tokens=TPB + 2, ignore_eos=True)
    async for delta in client.stream(prompt, sampling):
        seen += len(delta.token_ids)
        if seen == 2:  # the first token came from the context node, this one from here
            used = (await gen.kv_stats()).rank_used_blocks
            # the request holds its prompt and at most a few decode tokens' blocks
            low = placement.blocks_per_rank(len(prompt))
            high = placement.blocks_per_rank(len(prompt) + TPB + 2)
            assert all(lo <= u <= hi for lo, u, hi in zip(low, used, high, strict=True)), used
            assert max(used) - min(used) <= 1 and min(used) >= 1, used
    assert seen == TPB + 2


@pytest.mark.parametrize(("mode", "cp"), [("sync", 2), ("async", 4)])
async def test_helix_generation_node_gives_the_mixed_tokens(expected, mode, cp) -> None:
    ctx = await start("context")
    gen = await start("generation", **{"kv_transfer.mode": mode, "parallel.cp_size": cp})
    router = await start_router([ctx.address], [gen.address])
    try:
        async with AsyncClient(router.address, timeout=60) as client:
            info = await client.server_info()
            assert info.role == "router"
            results = await asyncio.gather(*(client.generate(p, SAMPLING) for p in PROMPTS))
            assert [r.token_ids for r in results] == expected[: len(PROMPTS)]
            # the generation node holds the prefix after the first: it reads only the rest
            reused = [(await client.generate(p, SAMPLING)).token_ids for p in REUSE]
            assert reused == expected[len(PROMPTS) :]
            await spread_while_decoding(client, gen, PROMPTS[2], cp)
        ctx_stats, gen_stats = await no_leaks(ctx, gen)
        assert gen_stats.rank_used_blocks == [0] * cp
        assert gen_stats.hit_blocks >= len(PREFIX) // TPB
        received = len(PROMPTS) + len(REUSE) + 1
        assert gen_stats.transfers["receive_complete"] == received
        assert ctx_stats.transfers["lease_complete"] == received
        assert ctx_stats.leased_blocks == 0
    finally:
        await router.stop()
        await gen.stop()
        await ctx.stop()


async def test_an_abort_while_the_ranks_read_cancels_every_share(expected) -> None:
    """Every read starts 1.5 s late: the client leaves while the request waits for its KV,
    each CP rank cancels its share, the receive ends cancelled once, nothing leaks, and the
    next request still gets the mixed node's tokens."""
    ctx = await start("context")
    gen = await start("generation", **{"parallel.cp_size": 2, "kv_transfer.read_delay_s": 1.5})
    router = await start_router([ctx.address], [gen.address])
    try:
        async with AsyncClient(router.address, timeout=60) as client:
            stream = client.stream(PROMPTS[2], SAMPLING, request_id="left")
            await anext(stream)  # the first token, from the context node
            for _ in range(500):
                if (await gen.scheduler_stats())["waiting_for_kv"]:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the request never waited for its KV")
            await stream.aclose()
            again = await client.generate(PROMPTS[2], SAMPLING)
            assert again.token_ids == expected[2]
        ctx_stats, gen_stats = await no_leaks(ctx, gen)
        assert gen_stats.transfers["receive_cancelled"] == 1, gen_stats.transfers
        assert gen_stats.transfers["receive_complete"] == 1, gen_stats.transfers
        assert gen_stats.transfers["receives_open"] == 0
        assert gen_stats.rank_used_blocks == [0, 0]
    finally:
        await router.stop()
        await gen.stop()
        await ctx.stop()
