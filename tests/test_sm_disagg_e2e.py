"""SM-level disaggregation end to end: real nodes, the client, two engines on the tiny model.

On a CPU the context and generation engines run the same two-engine protocol (two threads, one
shared runner and KV pool, handoffs between the flows) without streams, so these tests cover
the flows, handoffs, aborts at each stage and crash recovery that the GPU path relies on.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from greenroom.actors.engine import InjectFault
from greenroom.actors.step_profile import EngineProfileQuery
from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, RequestFailed
from greenroom.config import load_config
from greenroom.models.executor import PlanExecutor
from greenroom.node import Node

pytestmark = pytest.mark.slow


def node_config(sm: bool, **overrides):
    base = {
        "port": 0,
        "kv.num_blocks": 256,
        "kv.enable_prefix_reuse": False,
        "scheduler.max_num_tokens": 64,
        "scheduler.max_batch_size": 16,
        "sm_disagg.enabled": sm,
        "sm_disagg.context_max_num_tokens": 48,
        "sm_disagg.context_max_batch_size": 4,
        # every prompt through the context engine: these tests cover the handoff protocol
        "sm_disagg.policy": "fixed",
        "log_level": "warning",
    }
    base.update(overrides)
    return load_config(overrides=base)


def workload(n: int = 24, seed: int = 7) -> list[tuple[list[int], int]]:
    """Varied prompts (1 to 150 tokens, so some prefill in several chunks) and output lengths
    (1: finishes on the context engine's token; 2: one generation step after the handoff)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 3, 17, 40, 64, 97, 150])
        prompt = [rng.randrange(1, 512) for _ in range(length)]
        out.append((prompt, [1, 2, 5, 12, 20][i % 5]))
    return out


async def run_all(node: Node, requests: list[tuple[list[int], int]]) -> list[list[list[int]]]:
    """Every request streamed concurrently; per request, the token ids of each delta."""
    async with AsyncClient(node.address, timeout=60) as client:

        async def one(prompt: list[int], max_tokens: int) -> list[list[int]]:
            deltas = []
            async for delta in client.stream(
                prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            ):
                if delta.token_ids:
                    deltas.append(list(delta.token_ids))
                if delta.finish_reason:
                    assert delta.finish_reason == "length"
            return deltas

        return await asyncio.gather(*(one(p, m) for p, m in requests))


@pytest.fixture(scope="module")
def mixed_outputs() -> list[list[int]]:
    """Greedy outputs of the same workload in mixed (chunked prefill) mode: the reference."""

    async def run() -> list[list[int]]:
        node = await Node.start(node_config(sm=False))
        try:
            return [sum(d, []) for d in await run_all(node, workload())]
        finally:
            await node.stop()

    return asyncio.run(run())


async def test_greedy_outputs_equal_mixed_mode_under_concurrent_load(mixed_outputs) -> None:
    requests = workload()
    node = await Node.start(node_config(sm=True))
    try:
        assert set(node.refs) >= {"context", "generation"}
        results = await run_all(node, requests)
        for i, ((_, max_tokens), deltas) in enumerate(zip(requests, results, strict=True)):
            tokens = sum(deltas, [])
            assert len(tokens) == max_tokens, f"request {i}"
            assert tokens == mixed_outputs[i], f"request {i}"
            # the context engine's sampled token streams first, on its own
            assert deltas[0] == tokens[:1], f"request {i}: {deltas}"
        stats = await node.scheduler_stats()
        assert stats["handoffs"] == sum(1 for _, m in requests if m > 1)
        assert stats["prefill_tokens"] == sum(len(p) for p, _ in requests)
        await node.wait_blocks_free()
        assert (await node.scheduler_stats())["active"] == 0
    finally:
        await node.stop()


@pytest.mark.parametrize(("threshold", "ride_idle"), [(40, False), (0, False), (40, True)])
async def test_adaptive_routing_keeps_greedy_outputs_under_concurrent_load(
    mixed_outputs, threshold: int, ride_idle: bool
) -> None:
    """Short and long prompts interleaved: under ``adaptive`` those shorter than the threshold
    prefill inside generation steps, the others on the context engine and hand off; every
    request streams what mixed mode streams. ``0``: the node measures the threshold.
    ``ride_idle``: a long prompt may also ride while the generation flow carries nothing."""
    requests = workload()
    routing = {
        "sm_disagg.policy": "adaptive",
        "sm_disagg.routing_threshold_tokens": threshold,
        "sm_disagg.ride_when_generation_idle": ride_idle,
    }
    # a measured threshold is ride_knee_multiple knees; one knee keeps prompts of this
    # workload on both sides of it
    routing["sm_disagg.ride_knee_multiple"] = 1.0
    node = await Node.start(node_config(sm=True, **routing))
    try:
        measured = node.cfg.sm_disagg.routing_threshold_tokens
        assert measured == threshold if threshold else 1 <= measured <= 128
        results = await run_all(node, requests)
        for i, deltas in enumerate(results):
            assert sum(deltas, []) == mixed_outputs[i], f"request {i}"
        stats = await node.scheduler_stats()
        long = [m for p, m in requests if len(p) >= measured]
        assert stats["prefill_tokens"] == sum(len(p) for p, _ in requests)
        assert stats["prompts_in_generation"] >= 1
        if not ride_idle:
            # long prompts always hand off; a short one does only when decodes filled the
            # generation step's room
            assert stats["handoffs"] >= sum(1 for m in long if m > 1)
            assert stats["prompts_in_generation"] <= len(requests) - len(long)
        await node.wait_blocks_free()
        assert (await node.scheduler_stats())["active"] == 0
    finally:
        await node.stop()


@pytest.mark.parametrize("ride_idle", [True, False])
async def test_a_long_prompt_rides_while_the_generation_flow_is_idle(ride_idle: bool) -> None:
    """One prompt past the threshold on an idle node: with ``ride_when_generation_idle`` it
    prefills in a generation step (nothing there to delay); without, on the context engine."""
    prompt = [random.Random(3).randrange(1, 512) for _ in range(60)]
    node = await Node.start(
        node_config(
            sm=True,
            **{
                "sm_disagg.policy": "adaptive",
                "sm_disagg.routing_threshold_tokens": 40,
                "sm_disagg.ride_when_generation_idle": ride_idle,
            },
        )
    )
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            out = await client.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out.token_ids) == 4
        stats = await node.scheduler_stats()
        assert (stats.get("prompts_in_generation", 0), stats.get("handoffs", 0)) == (
            (1, 0) if ride_idle else (0, 1)
        )
    finally:
        await node.stop()


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "plain"])
async def test_generation_engine_overlaps_steps_without_changing_tokens(
    mixed_outputs, policy: str, overlap: bool
) -> None:
    """The generation engine launches each plan behind the one in flight (``overlap_steps``,
    the default) and streams what plain steps and mixed mode stream, short and long prompts
    interleaved; the context engine always runs plain steps."""
    requests = workload()
    node = await Node.start(
        node_config(
            sm=True,
            **{
                "sm_disagg.policy": policy,
                "sm_disagg.routing_threshold_tokens": 40,
                "model.overlap_steps": overlap,
            },
        )
    )
    try:
        engines = {r: node.runtime.cell(f"{r}-engine").actor for r in ("context", "generation")}
        assert engines["generation"].overlap is overlap
        assert engines["context"].overlap is False
        results = await run_all(node, requests)
        for i, deltas in enumerate(results):
            assert sum(deltas, []) == mixed_outputs[i], f"request {i}"
        profiles = {
            role: (await node.refs[role].ask(EngineProfileQuery(), timeout=10)).to_dict()
            for role in engines
        }
        assert profiles["context"]["overlapped_steps"] == 0
        assert profiles["context"]["other"]["steps"] >= 1
        generation = profiles["generation"]
        steps = generation["decode"]["steps"] + generation["other"]["steps"]
        assert steps >= max(m for _, m in requests) - 1
        if overlap:  # every generation plan with steps was launched behind the last
            assert generation["overlapped_steps"] == steps
        else:
            assert generation["overlapped_steps"] == 0
        if policy == "adaptive":
            assert (await node.scheduler_stats())["prompts_in_generation"] >= 1
        await node.wait_blocks_free()
        assert (await node.scheduler_stats())["active"] == 0
    finally:
        await node.stop()


async def test_first_token_survives_the_handoff(mixed_outputs) -> None:
    """The generation engine decodes from the token the context engine sampled: with two output
    tokens, the second is right only if the first reached the generation engine intact."""
    requests = [(p, 2) for p, _ in workload()[:8]]
    node = await Node.start(node_config(sm=True))
    try:
        results = await run_all(node, requests)
        mixed = await _mixed_prefixes(requests)
        for i, deltas in enumerate(results):
            assert sum(deltas, []) == mixed[i], f"request {i}"
        assert (await node.scheduler_stats())["handoffs"] == len(requests)
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def _mixed_prefixes(requests: list[tuple[list[int], int]]) -> list[list[int]]:
    node = await Node.start(node_config(sm=False))
    try:
        return [sum(d, []) for d in await run_all(node, requests)]
    finally:
        await node.stop()


class FlowGate:
    """Holds the plans of one flow inside the engine (its thread blocks) until opened. It
    gates ``launch``, which plain steps (``execute``) and overlapped steps both go through."""

    def __init__(self, monkeypatch, flow: str) -> None:
        self.flow = flow
        self.open = threading.Event()
        self.entered = threading.Event()
        launch = PlanExecutor.launch

        def gated(executor, plan):
            if plan.flow == self.flow and plan.steps and not self.open.is_set():
                self.entered.set()
                self.open.wait(timeout=20)
            return launch(executor, plan)

        monkeypatch.setattr(PlanExecutor, "launch", gated)

    async def wait_entered(self, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, self.entered.wait, timeout), "no gated plan"


async def _abort_while_gated(node: Node, gate: FlowGate, stage: str) -> None:
    """Abort a request while a plan holding it waits in the engine: its blocks stay allocated
    until that plan comes back, then everything is free."""
    async with AsyncClient(node.address, timeout=60) as client:
        stream = client.stream(
            list(range(1, 120)), SamplingParams(max_tokens=50, ignore_eos=True), request_id=stage
        )
        if stage == "prefill":
            first = asyncio.ensure_future(stream.__anext__())
            await gate.wait_entered()
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
        else:
            delta = await stream.__anext__()  # the context engine's token
            assert len(delta.token_ids) == 1
            await gate.wait_entered()  # its first decode is inside the generation engine
        await stream.aclose()  # leaving the stream aborts the request
        await asyncio.sleep(0.2)
        held = await node.kv_stats()
        assert held.free_blocks < held.total_blocks, "blocks freed under an in-flight plan"
        gate.open.set()
        await node.wait_blocks_free()
        # the node still serves
        ok = await client.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(ok.token_ids) == 4
    await node.wait_blocks_free()
    stats = await node.scheduler_stats()
    assert stats["active"] == 0 and not any(stats["running"].values())


async def test_abort_during_prefill_frees_everything(monkeypatch) -> None:
    gate = FlowGate(monkeypatch, "context")
    node = await Node.start(node_config(sm=True))
    try:
        await _abort_while_gated(node, gate, "prefill")
        assert (await node.scheduler_stats())["handoffs"] == 1  # only the later request's
    finally:
        gate.open.set()
        await node.stop()


async def test_abort_between_prefill_and_first_decode_frees_everything(monkeypatch) -> None:
    gate = FlowGate(monkeypatch, "generation")
    node = await Node.start(node_config(sm=True))
    try:
        await _abort_while_gated(node, gate, "handoff")
    finally:
        gate.open.set()
        await node.stop()


async def test_abort_during_decode_frees_everything() -> None:
    node = await Node.start(node_config(sm=True))
    try:
        async with AsyncClient(node.address, timeout=60) as client:

            async def abort_after(n: int, prompt_len: int) -> int:
                got = 0
                async for delta in client.stream(
                    list(range(1, prompt_len + 1)),
                    SamplingParams(max_tokens=1000, ignore_eos=True),
                ):
                    got += len(delta.token_ids)
                    if got >= n:
                        break  # leaving the stream aborts the request
                return got

            got = await asyncio.gather(*(abort_after(3 + i, 10 + 20 * i) for i in range(6)))
            assert all(g >= 3 for g in got)
        await node.wait_blocks_free()
        stats = await node.scheduler_stats()
        assert stats["handoffs"] == 6 and stats["active"] == 0
    finally:
        await node.stop()


async def _long_decodes(client: AsyncClient, n: int, max_tokens: int) -> list[asyncio.Future]:
    """Start n requests and return once each has its first token (all are in generation)."""
    firsts = [asyncio.get_running_loop().create_future() for _ in range(n)]

    async def one(i: int) -> int:
        count = 0
        async for delta in client.stream(
            [i + 1, 2, 3, 4], SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        ):
            count += len(delta.token_ids)
            if not firsts[i].done():
                firsts[i].set_result(None)
        return count

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*firsts), timeout=20)
    return tasks


async def test_context_engine_crash_fails_its_requests_and_the_node_recovers() -> None:
    node = await Node.start(node_config(sm=True))
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            decoding = await _long_decodes(client, 3, max_tokens=300)
            await node.refs["context"].tell(InjectFault(reason="context crash"))
            with pytest.raises(RequestFailed, match="crash"):
                await client.generate(list(range(1, 30)), SamplingParams(max_tokens=5))
            # requests already handed off live in the generation engine: they finish
            assert await asyncio.gather(*decoding) == [300, 300, 300]
            ok = await client.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
            assert len(ok.token_ids) == 6
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_generation_engine_crash_fails_its_requests_and_the_node_recovers() -> None:
    node = await Node.start(node_config(sm=True))
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            decoding = await _long_decodes(client, 3, max_tokens=1500)
            await node.refs["generation"].tell(InjectFault(reason="generation crash"))
            results = await asyncio.gather(*decoding, return_exceptions=True)
            assert all(isinstance(r, RequestFailed) for r in results), results
            ok = await client.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
            assert len(ok.token_ids) == 6
            # the restarted generation engine decodes what the context engine hands it
            again = await run_all(node, workload(6, seed=3))
            assert [len(sum(d, [])) for d in again] == [m for _, m in workload(6, seed=3)]
        await node.wait_blocks_free()
    finally:
        await node.stop()


def test_bench_compares_sm_points_with_the_mixed_curve_at_equal_throughput() -> None:
    from greenroom.bench.sm_disagg import Point, best_comparison, compare_at_equal_throughput

    def point(mode: str, tput: float, user: float, ttft_p99: float) -> Point:
        return Point(mode, "openorca", 1.0, 10, 0, 1.0, tput, user, 1000 / user, 1.0, ttft_p99, 1.0)

    mixed = [point("mixed", 1000, 100, 50), point("mixed", 3000, 60, 150)]
    sm = [point("sm30", 2000, 104, 120), point("sm30", 500, 120, 10), point("sm50", 1500, 80, 300)]
    rows = compare_at_equal_throughput(mixed, sm)
    assert rows[0]["mixed_tokens_per_s_per_user"] == pytest.approx(80)
    assert rows[0]["user_speedup"] == pytest.approx(1.3)
    assert rows[0]["ttft_p99_ratio"] == pytest.approx(1.2) and rows[0]["meets_target"]
    assert rows[1]["user_speedup"] is None  # below the mixed curve's range: not compared
    assert rows[2]["ttft_p99_ratio"] == pytest.approx(4.0) and not rows[2]["meets_target"]
    assert best_comparison(rows)["mode"] == "sm30"
