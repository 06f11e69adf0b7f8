"""Helix context parallelism end to end: `greenroom serve --cp-size N` on CPU ranks (gloo).

Greedy tokens at cp 1, 2, 3, cp 2 x tp 2 (`serve`) and cp 4 (`launch` over two nodes) equal
transformers' (so each other's) over decodes that cross many block boundaries (4 tokens per
block), with requests of different lengths joining mid-run, chunked prefill beside decodes and
prefix reuse, and no block leaks; with a host tier each rank offloads and onboards its own
blocks; a CP rank killed mid-stream fails its requests explicitly and the group restarts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tp_deploy import free_port_pair, wait_line
from tiny_checkpoints import random_prompts, save_checkpoint, transformers_greedy

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient, RequestFailed

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

NEW_TOKENS = 20
SHARED = 12  # the last prompt starts with the second one's first three blocks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=12,  # 12 heads: split over 2, 3 and 4 CP ranks
        num_key_value_heads=4,
        vocab_size=251,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return save_checkpoint(config, tmp_path_factory.mktemp("helix") / "llama", seed=14)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    p0, p1, p2, tail = random_prompts((5, 29, 13, 6), 251, seed=3)
    return [p0, p1, p2, p1[:SHARED] + tail]


@pytest.fixture(scope="module")
def expected(checkpoint, prompts) -> list[list[int]]:
    return greedy(checkpoint, prompts)


def greedy(checkpoint, prompts: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(checkpoint, prompts, NEW_TOKENS)


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "greenroom.cli", "serve", "--port", "0", "--log-level", "warning"]
        + ["--no-http", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        found = re.search(r"clients connect to (\S+)", line)
        if found:
            return proc, found.group(1)
    raise AssertionError(f"serve exited with {proc.wait()} before it was ready")


def worker_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(x) for x in path.read_text().split()] if path.exists() else []
    out = []
    for kid in kids:
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_text()
        except OSError:
            continue
        if "parallel.worker" in cmdline.replace("\0", " "):
            out.append(kid)
    return out


def node_args(checkpoint, cp: int, blocks: int = 48) -> list[str]:
    return [
        "--model", str(checkpoint), "--cp-size", str(cp), "--tokens-per-block", "4",
        "--num-blocks", str(blocks), "--max-num-tokens", "16",
    ]  # fmt: skip


async def stream_until_error(address: str, prompt: list[int]) -> BaseException | None:
    async with AsyncClient(address, timeout=60) as client:
        try:
            await client.generate(prompt, SamplingParams(max_tokens=400, ignore_eos=True))
        except RequestFailed as exc:
            return exc
    return None


async def joining_mid_run(client: AsyncClient, prompts: list[list[int]]) -> list:
    """Each request starts once the one before it has streamed a few tokens, so every later
    one joins (and is prefilled in chunks) while the earlier ones decode."""
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    started = [asyncio.Event() for _ in prompts]
    started[0].set()

    async def run(i: int) -> tuple[list[int], int]:
        await started[i].wait()
        tokens, cached = [], 0
        async for delta in client.stream(prompts[i], sampling):
            tokens += delta.token_ids
            if len(tokens) >= 3 and i + 1 < len(prompts):
                started[i + 1].set()
            if delta.metrics is not None:
                cached = delta.metrics.num_cached_tokens
        return tokens, cached

    return await asyncio.gather(*(run(i) for i in range(len(prompts))))


async def check_node(address: str, cp: int, prompts, expected, tp: int = 1) -> None:
    async with AsyncClient(address, timeout=120) as client:
        info = await client.server_info()
        assert (f"cp{cp}" in info.device) == (cp > 1) and info.num_blocks == 48 * cp
        assert (f"tp{tp}" in info.device) == (tp > 1)
        results = await joining_mid_run(client, prompts)
        assert [tokens for tokens, _ in results] == expected
        # the last prompt found the second one's first blocks cached, each on its rank
        assert results[3][1] >= SHARED
        stats = await client.node_stats()
        assert stats.kv_free_blocks == stats.kv_total_blocks  # nothing leaked


@pytest.mark.parametrize(
    ("cp", "tp"), [(1, 1), (2, 1), (3, 1), (2, 2)]
)  # cp 4: the two-node launch below
async def test_serve_helix_gives_the_transformers_tokens(checkpoint, prompts, expected, cp, tp):
    proc, address = start_serve(*node_args(checkpoint, cp), "--tp-size", str(tp))
    try:
        await check_node(address, cp, prompts, expected, tp)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_launch_cp_4_over_two_nodes_from_a_slurm_env(checkpoint, prompts, expected):
    """`greenroom launch` on two "nodes" of this machine, two CP ranks each: Slurm's world
    (2 tasks, 2 nodes) covers the 4 CP ranks, node 0 hosting the head."""
    port = free_port_pair()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env |= {
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
        "MASTER_PORT": str(port),
    }
    args = [sys.executable, "-m", "greenroom.cli", "launch", "--log-level", "warning"]
    args += ["--no-http", *node_args(checkpoint, 4)]
    nodes = [
        subprocess.Popen(
            args + (["--port", "0"] if n == 0 else []),
            stdout=subprocess.PIPE,
            text=True,
            env=env | {"SLURM_PROCID": str(n), "SLURM_LOCALID": "0", "SLURM_NODEID": str(n)},
        )
        for n in (0, 1)
    ]
    seen: list[str] = []
    try:
        address = wait_line(nodes[0], r"clients connect to (\S+)", seen).group(1)

        asyncio.run(check_node(address, 4, prompts, expected))
        nodes[0].send_signal(signal.SIGTERM)
        assert nodes[0].wait(timeout=30) == 0
        assert nodes[1].wait(timeout=30) == 0  # the head's shutdown stops the agent
        text = "".join(seen) + nodes[1].stdout.read()
        assert "launch (slurm): node 1 of 2" in text
        assert "node 1: 2(pp0 cp2 tp0) 3(pp0 cp3 tp0)" in text
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()


async def test_host_tier_each_rank_offloads_and_onboards_its_own_blocks(
    checkpoint, prompts, expected
):
    """10 blocks per rank: a long request evicts the second prompt's cached blocks to the host
    tier, each rank copying its own; the last prompt onboards its shared prefix back."""
    from greenroom.config import load_config
    from greenroom.node import Node

    other = random_prompts((46,), 251, seed=5)[0]
    cfg = load_config(
        overrides={
            "port": 0, "model.path": str(checkpoint), "parallel.cp_size": 2,
            "kv.tokens_per_block": 4, "kv.num_blocks": 10, "kv.host_blocks": 32,
            "scheduler.max_num_tokens": 16, "http.enabled": False, "log_level": "warning",
        }
    )  # fmt: skip
    node = await Node.start(cfg)
    try:
        sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        async with AsyncClient(node.address, timeout=120) as client:
            assert (await client.generate(prompts[1], sampling)).token_ids == expected[1]
            evicting = await client.generate(other, sampling)
            assert evicting.token_ids == greedy(checkpoint, [other])[0]
            again = await client.generate(prompts[3], sampling)
            assert again.token_ids == expected[3]
            assert again.metrics.num_cached_tokens >= SHARED
        stats = await node.wait_blocks_free()
        assert stats.offloaded_blocks > 0 and stats.onboarded_blocks > 0, stats
    finally:
        await node.stop()


def test_kill_9_of_a_cp_rank_fails_its_requests_and_the_group_restarts(
    checkpoint, prompts, expected
):
    serve, address = start_serve(*node_args(checkpoint, 2, blocks=256), "--max-model-len", "512")
    try:

        async def kill_mid_stream() -> None:
            streams = [asyncio.ensure_future(stream_until_error(address, p)) for p in prompts]
            await asyncio.sleep(1.0)
            workers = worker_pids(serve.pid)
            assert len(workers) == 2
            killed_at = time.monotonic()
            os.kill(workers[1], signal.SIGKILL)
            errors = await asyncio.wait_for(asyncio.gather(*streams), 60)
            assert all(isinstance(e, RequestFailed) for e in errors), errors
            assert time.monotonic() - killed_at < 15
            async with AsyncClient(address, timeout=120) as client:  # the group restarted
                sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
                again = await client.generate(prompts[1], sampling)
                assert again.token_ids == expected[1]

        asyncio.run(kill_mid_stream())
    finally:
        serve.kill()
        serve.wait(timeout=30)
