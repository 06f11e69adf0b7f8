"""Disaggregated serving under faults: every request ends with tokens or an explicit error,
bystanders get the right tokens, and no KV block stays held on either node afterwards.

Real NIXL over UCX; the nodes a test kills run in a child process (SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from disagg_cluster import TPB, ChildNode, cluster, no_leaks, start, start_router, synthetic

from greenroom.actors.engine import InjectTransferFault
from greenroom.bus.messages import (
    AbortRequest,
    DecodeRequest,
    GenerateRequest,
    PrefillRequest,
    RequestError,
    SamplingParams,
    TokenDelta,
    TransferDone,
    TransferHandle,
)
from greenroom.client import AsyncClient, GreenroomError, RequestFailed, RequestRejected

pytestmark = pytest.mark.slow

SAMPLING = SamplingParams(max_tokens=6, ignore_eos=True)
LONG = SamplingParams(max_tokens=24, ignore_eos=True)
BYSTANDERS = [synthetic(20 + i, 20 + 9 * i) for i in range(3)]
_expected: dict[tuple[tuple[int, ...], int], list[int]] = {}


async def expected(prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
    """Greedy tokens of a mixed node (cached across tests)."""
    todo = [p for p in prompts if (tuple(p), sampling.max_tokens) not in _expected]
    if todo:
        node = await start("mixed")
        try:
            async with AsyncClient(node.address, timeout=60) as c:
                for p in todo:
                    _expected[(tuple(p), sampling.max_tokens)] = (
                        await c.generate(p, sampling)
                    ).token_ids
        finally:
            await node.stop()
    return [_expected[(tuple(p), sampling.max_tokens)] for p in prompts]


async def run_bystanders(address: str, sampling: SamplingParams = LONG) -> list[list[int]]:
    async with AsyncClient(address, timeout=60) as c:
        results = await asyncio.gather(*(c.generate(p, sampling) for p in BYSTANDERS))
    return [r.token_ids for r in results]


async def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        await asyncio.sleep(0.01)


def waiting_for_kv(node, n: int = 1):
    async def check() -> bool:
        return (await node.scheduler_stats())["waiting_for_kv"] >= n

    return check


async def collect(q: asyncio.Queue, until, timeout: float = 20.0) -> list:
    items = []
    async with asyncio.timeout(timeout):
        while True:
            items.append(await q.get())
            if until(items[-1]):
                return items


def final(item) -> bool:
    return isinstance(item, RequestError) or (
        isinstance(item, TokenDelta) and item.finish_reason is not None
    )


# ---------------------------------------------------------------------------- nodes die


async def test_context_node_killed_mid_transfer() -> None:
    want = await expected(BYSTANDERS, LONG)
    victim = ChildNode("context")  # a real process: SIGKILL, its NIXL agent gone with it
    ctx = await start("context")
    gen = await start("generation")
    await victim.ready()
    to_victim = await start_router([victim.address], [gen.address])
    to_ok = await start_router([ctx.address], [gen.address])
    try:
        # no read starts for a while: the victim's read is in the generation node's hands
        # when its context node dies
        await gen.refs["mixed"].ask(InjectTransferFault(hold_s=1.5), timeout=5)
        async with AsyncClient(to_victim.address, timeout=30) as c:
            lost = asyncio.ensure_future(c.generate(synthetic(5, 40), SAMPLING))
            await wait_for(waiting_for_kv(gen), what="the victim waits for its KV")
            busy = asyncio.ensure_future(run_bystanders(to_ok.address))
            victim.kill()
            with pytest.raises(GreenroomError, match="KV transfer"):
                await lost
            assert await busy == want
        assert await run_bystanders(to_ok.address) == want  # the node serves new requests
        (gen_stats, _) = await no_leaks(gen, ctx)
    finally:
        victim.kill()
        await to_victim.stop()
        await to_ok.stop()
        await ctx.stop()
        await gen.stop()
    failed = gen_stats.transfers.get("receive_error", 0)
    assert failed + gen_stats.transfers.get("receive_timed_out", 0) == 1


async def test_generation_node_killed_mid_transfer_lease_frees_context_blocks() -> None:
    want = await expected(BYSTANDERS, LONG)
    ctx = await start("context", **{"kv_transfer.lease_s": 8.0, "kv_transfer.lease_margin_s": 0.5})
    victim = await start("generation", **{"kv_transfer.read_delay_s": 30.0})
    gen = await start("generation")
    to_victim = await start_router([ctx.address], [victim.address])
    to_ok = await start_router([ctx.address], [gen.address])
    try:
        async with AsyncClient(to_victim.address, timeout=30) as c:
            stream = c.stream(synthetic(6, 50), SAMPLING)
            first = await anext(stream)  # from the context node; the read is now delayed
            await wait_for(waiting_for_kv(victim), what="the victim waits for its KV")
            busy = asyncio.ensure_future(run_bystanders(to_ok.address))
            await victim.runtime.shutdown(timeout=5)  # gone at once: no drain, no answers
            with pytest.raises(GreenroomError, match="not answering"):
                await anext(stream)
            assert first.finish_reason is None
            assert await busy == want
        ctx_stats, _ = await no_leaks(ctx, gen)  # the lease ran out on its own
        assert await run_bystanders(to_ok.address) == want
    finally:
        await to_victim.stop()
        await to_ok.stop()
        await ctx.stop()
        await victim.stop()
        await gen.stop()
    assert ctx_stats.transfers["lease_timed_out"] == 1


async def _leased(node) -> bool:
    return (await node.kv_stats()).leased_blocks > 0


# ---------------------------------------------------------------------------- lost messages


async def test_lost_acknowledgement_lease_expiry_frees_context_blocks() -> None:
    want = await expected(BYSTANDERS + [synthetic(7, 33)], SAMPLING)
    extra = {"kv_transfer.lease_s": 5.0, "kv_transfer.lease_margin_s": 0.5}
    async with cluster("async", **extra) as c:
        ctx, gen = c.context[0], c.generation[0]
        prompt = synthetic(7, 33)
        async with AsyncClient(ctx.address) as cc, AsyncClient(gen.address) as gc:
            busy = asyncio.ensure_future(run_bystanders(c.address, SAMPLING))
            q = cc.open_replies("lost-ack")
            await cc.send(
                PrefillRequest(request_id="lost-ack", prompt_token_ids=prompt, sampling=SAMPLING)
            )
            items = await collect(q, lambda i: isinstance(i, TransferHandle | RequestError))
            handle = items[-1]
            gq = gc.open_replies("lost-ack")
            await gc.send(
                DecodeRequest(
                    request_id="lost-ack", prompt_token_ids=prompt, sampling=SAMPLING, handle=handle
                )
            )
            got = await collect(gq, final)
            # no ReleaseKV: the acknowledgement is lost
            assert isinstance(got[0], TransferDone) and got[0].state == "complete"
            tokens = [handle.first_token] + [
                t for d in got if isinstance(d, TokenDelta) for t in d.token_ids
            ]
            assert tokens == want[-1]
            assert await busy == want[:-1]
            assert (await ctx.kv_stats()).leased_blocks > 0
        ctx_stats, _ = await no_leaks(ctx, gen)
    assert ctx_stats.transfers["lease_timed_out"] == 1


async def test_client_abort_before_during_and_after_the_transfer() -> None:
    prompt = synthetic(8, 45)
    want = await expected(BYSTANDERS + [prompt], LONG)
    ctx = await start("context")
    # one request at a time on the generation node: a second one queues behind a held read
    gen = await start("generation", **{"scheduler.max_num_active_requests": 1})
    router = await start_router([ctx.address], [gen.address])
    try:
        async with AsyncClient(router.address, timeout=30) as client:
            busy = asyncio.ensure_future(run_bystanders(router.address))
            # before: the abort reaches the router while the context node prefills
            q = client.open_replies("before")
            await client.send(
                GenerateRequest(request_id="before", prompt_token_ids=prompt, sampling=LONG)
            )
            await client.send(AbortRequest(request_id="before"))
            items = await collect(q, final)
            assert items[-1].finish_reason == "abort"
            assert await busy == want[:-1]  # no read is open on the generation node now
            # during: the generation node holds this read (until the hold is lifted, or the
            # read's own deadline); queued: prefilled, waiting for admission behind it
            await gen.refs["mixed"].ask(InjectTransferFault(hold_s=30.0), timeout=5)
            during = client.stream(prompt, LONG, request_id="during")
            await anext(during)
            await wait_for(waiting_for_kv(gen), what="the read is held")
            queued = client.stream(prompt, LONG, request_id="queued")
            await anext(queued)
            await wait_for(queued_for_admission(gen), what="the request queues for admission")
            await queued.aclose()
            await during.aclose()
            await wait_for(no_receivers(gen), what="the aborted receivers are gone")
            await gen.refs["mixed"].ask(InjectTransferFault(hold_s=0.0), timeout=5)
            # after: a few tokens decoded on the generation node, then the abort
            busy = asyncio.ensure_future(run_bystanders(router.address))
            got = []
            async for d in client.stream(prompt, LONG, request_id="after"):
                got.extend(d.token_ids)
                if len(got) >= 3:
                    break
            assert got == want[-1][:3]
            assert await busy == want[:-1]
        ctx_stats, gen_stats = await no_leaks(ctx, gen)
        assert await run_bystanders(router.address) == want[:-1]
    finally:
        await router.stop()
        await ctx.stop()
        await gen.stop()
    # each aborted receive ends cancelled once, whether its read was held or not yet admitted;
    # "after" and the bystanders complete; the context node frees every lease as it is told
    # ("before" leased only if its first token came before the abort)
    assert gen_stats.transfers == {
        "receive_cancelled": 2,
        "receive_complete": 7,
        "leases_open": 0,
        "receives_open": 0,
    }
    before_leased = ctx_stats.transfers["lease_cancelled"] - 2
    assert before_leased in (0, 1), ctx_stats.transfers
    assert ctx_stats.transfers == {
        "lease_cancelled": 2 + before_leased,
        "lease_complete": 7,
        "leases_open": 0,
        "receives_open": 0,
    }


def queued_for_admission(node):
    async def check() -> bool:
        return (await node.scheduler_stats())["waiting"] >= 1

    return check


def no_receivers(node):
    async def check() -> bool:
        stats = await node.scheduler_stats()
        return stats["waiting"] == stats["waiting_for_kv"] == 0

    return check


# ---------------------------------------------------------------------------- NIXL and pool


async def test_injected_nixl_error_fails_one_request_only() -> None:
    want = await expected(BYSTANDERS, LONG)
    async with cluster("sync") as c:
        ctx, gen = c.context[0], c.generation[0]
        await gen.refs["mixed"].ask(InjectTransferFault(nixl_error=True), timeout=5)
        async with AsyncClient(c.address, timeout=30) as client:
            with pytest.raises(RequestFailed, match="KV"):
                await client.generate(synthetic(9, 40), SAMPLING)
        assert await run_bystanders(c.address) == want
        ctx_stats, gen_stats = await no_leaks(ctx, gen)
    assert ctx_stats.transfers["lease_error"] == 1
    assert gen_stats.transfers["receive_error"] == 1


async def test_generation_pool_too_small_is_an_error_and_frees_the_lease() -> None:
    want = await expected(BYSTANDERS, SAMPLING)
    async with cluster("async") as c:
        ctx = c.context[0]
        small = await start("generation", **{"kv.num_blocks": 6})  # 5 blocks: 80 tokens
        router = await start_router([ctx.address], [small.address])
        try:
            async with AsyncClient(router.address, timeout=30) as client:
                busy = asyncio.ensure_future(run_bystanders(router.address, SAMPLING))
                # the node caps max_model_len at what its pool holds, so the generation node
                # refuses the request outright; the context node's lease must still be freed
                with pytest.raises(RequestRejected, match="max_model_len is 80"):
                    await client.generate(synthetic(10, 6 * TPB), SAMPLING)
                assert await busy == want
            await no_leaks(ctx, small)
        finally:
            await router.stop()
            await small.stop()


# ---------------------------------------------------------------------------- bad input


async def test_bad_handles_are_refused_without_effect_on_others() -> None:
    want = await expected(BYSTANDERS, LONG)
    async with cluster("async") as c:
        ctx, gen = c.context[0], c.generation[0]
        prompt = synthetic(11, 40)
        async with AsyncClient(ctx.address) as cc, AsyncClient(gen.address) as gc:
            q = cc.open_replies("real")
            await cc.send(
                PrefillRequest(request_id="real", prompt_token_ids=prompt, sampling=SAMPLING)
            )
            handle = (await collect(q, lambda i: isinstance(i, TransferHandle)))[-1]
            busy = asyncio.ensure_future(run_bystanders(c.address))
            bad = {
                "outside the context pool": {"block_ids": [1, 2, handle.pool_blocks]},
                "tp_size mismatch": {"tp_size": 2},
                "need 3": {"block_ids": handle.block_ids[:2]},
                "KV read failed": {"agent_name": "ghost", "agent_metadata": b"not metadata"},
            }
            for i, (reason, change) in enumerate(bad.items()):
                rid = f"bad-{i}"
                h = _replace(handle, request_id=rid, **change)
                gq = gc.open_replies(rid)
                await gc.send(
                    DecodeRequest(
                        request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING, handle=h
                    )
                )
                items = await collect(gq, final)
                assert isinstance(items[0], TransferDone) and items[0].state == "error"
                assert isinstance(items[-1], RequestError) and reason in items[-1].message
            assert await busy == want
            with contextlib.suppress(Exception):
                await cc.send(_release("real"))
        await no_leaks(ctx, gen)


def _replace(handle, **changes):
    import msgspec

    return msgspec.structs.replace(handle, **changes)


def _release(rid: str):
    from greenroom.bus.messages import ReleaseKV

    return ReleaseKV(request_id=rid, outcome="cancelled")
