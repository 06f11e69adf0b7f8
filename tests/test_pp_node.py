"""Pipeline parallelism end to end on CPU ranks (gloo): a node with --pp-size serves the
single-process greedy tokens; stage 0 keeps running micro-batches while the last stage's
results are held back (fails on a scheduler that waits for a response before the next
micro-batch); kill -9 of a middle stage fails its requests, never hangs, and the group
restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from pp_stages import InProcessPipeline
from tiny_checkpoints import save_checkpoint

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, RequestFailed
from greenroom.config import build_config
from greenroom.node import Node
from greenroom.parallel import messages as m

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 200, 3, 17], list(range(10, 41)), list(range(10, 30)) + [7, 7], [3, 4, 5]]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_checkpoint(config, tmp_path_factory.mktemp("ppnode") / "llama4", seed=4)


def reference_tokens(checkpoint) -> list[list[int]]:
    """One request at a time through in-process stages (the whole model's tokens: see
    test_pp_parity)."""
    from greenroom.bus.messages import NewSequence, SequenceStep, StepPlan

    pipe = InProcessPipeline(checkpoint, 1)
    out = []
    for i, prompt in enumerate(PROMPTS):
        new = NewSequence(
            request_id=f"r{i}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=MAX_TOKENS),
            num_cached_tokens=0,
            block_ids=list(range(1 + 12 * i, 13 + 12 * i)),
        )
        plan = StepPlan(iteration=0, new=[new], steps=[SequenceStep(f"r{i}", len(prompt))])
        tokens = []
        for step in range(MAX_TOKENS):
            tokens.append(pipe.execute(plan).sampled[0].token_id)
            plan = StepPlan(iteration=step + 1, steps=[SequenceStep(f"r{i}", 1)])
        out.append(tokens)
    return out


def node_config(checkpoint, **parallel):
    return build_config(
        {
            "port": 0,
            "log_level": "warning",
            "log_stats_interval_s": 0,
            "model": {"path": str(checkpoint), "device": "cpu", "cpu_threads": 1},
            "kv": {"num_blocks": 96, "tokens_per_block": 4},
            "scheduler": {"max_num_tokens": 16, "max_batch_size": 1},
            "http": {"enabled": False},
            "parallel": {"collective_timeout_s": 20, "stage_reports": True, **parallel},
        }
    )


async def stage_runs(node: Node) -> m.StageRuns:
    return await node.refs["mixed"].ask(m.StageRunsQuery(), timeout=10)


async def wait_until(predicate, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_stage_zero_runs_pp_depth_micro_batches_while_results_are_held(checkpoint):
    expected = reference_tokens(checkpoint)
    node = await Node.start(node_config(checkpoint, pp_size=2))
    try:
        assert "pp2" in node.info.device
        engine = node.refs["mixed"]
        await engine.ask(m.HoldResults(epoch=0, hold=True), timeout=10)
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        async with AsyncClient(node.address, timeout=120) as client:
            tasks = [asyncio.ensure_future(client.generate(p, sampling)) for p in PROMPTS]

            async def stage0_ran_two() -> bool:
                runs = (await stage_runs(node)).runs
                return len({r[1] for r in runs if r[0] == 0}) >= 2

            await wait_until(stage0_ran_two)
            await asyncio.sleep(1.0)  # a third micro-batch would have been issued by now
            stats = await stage_runs(node)
            stage0 = {r[1] for r in stats.runs if r[0] == 0}
            assert stage0 == {1, 2}  # pp_depth (= pp_size) micro-batches, no response back
            assert stats.results == 0
            requests = [stats.plan_requests[str(p)] for p in sorted(stage0)]
            assert len({rid for ids in requests for rid in ids}) == 2  # disjoint
            await engine.ask(m.HoldResults(epoch=0, hold=False), timeout=10)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert [r.token_ids for r in results] == expected
    finally:
        await node.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel", [{"pp_size": 3, "pp_layers": [2, 1, 1]}, {"pp_size": 2, "tp_size": 2}]
)
async def test_pp3_uneven_and_pp2_by_tp2_serve_the_reference_tokens(checkpoint, parallel):
    expected = reference_tokens(checkpoint)
    cfg = node_config(checkpoint, **parallel)
    cfg = build_config({**_builtins(cfg), "scheduler": {"max_num_tokens": 12, "max_batch_size": 4}})
    node = await Node.start(cfg)
    try:
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        async with AsyncClient(node.address, timeout=120) as client:
            # concurrent: chunked prefill beside decodes, requests joining and leaving
            first = [asyncio.ensure_future(client.generate(p, sampling)) for p in PROMPTS[:2]]
            await asyncio.sleep(0.3)
            later = [client.generate(p, sampling) for p in PROMPTS[2:]]
            results = await asyncio.gather(*first, *later)
            assert [r.token_ids for r in results] == expected
            again = await client.generate(PROMPTS[1], sampling)  # prefix reuse
            assert again.token_ids == expected[1]
            assert again.metrics.num_cached_tokens > 0
    finally:
        await node.stop()


def _builtins(cfg):
    import msgspec

    return msgspec.to_builtins(cfg)


@pytest.mark.slow
async def test_kill_9_of_a_middle_stage_fails_its_requests_and_the_group_restarts(checkpoint):
    expected = reference_tokens(checkpoint)
    node = await Node.start(node_config(checkpoint, pp_size=3))
    try:
        sampling = SamplingParams(max_tokens=200, ignore_eos=True)
        async with AsyncClient(node.address, timeout=60) as client:
            streams = [asyncio.ensure_future(client.generate(p, sampling)) for p in PROMPTS[:2]]

            async def running() -> bool:
                return len((await stage_runs(node)).runs) > 6

            await wait_until(running)
            pid = (await stage_runs(node)).rank_pids["1"]
            os.kill(pid, signal.SIGKILL)
            done = await asyncio.wait_for(
                asyncio.gather(*streams, return_exceptions=True), timeout=60
            )
            assert all(isinstance(r, RequestFailed) for r in done), done
            # recovery: the restarted group serves again
            short = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
            result = await asyncio.wait_for(client.generate(PROMPTS[0], short), timeout=120)
            assert result.token_ids == expected[0]
    finally:
        await node.stop()
