"""`greenroom serve --tp-size 2` and `greenroom launch` end to end on CPU ranks (gloo): one
rank's tokens, multi-node launches on loopback, rank faults.

Two "nodes" are two `greenroom launch` processes on this machine: node 0 (the head and rank 0)
and node 1 (a node agent and rank 1). One deployment takes node 0's place from a torchrun
environment and node 1's from flags; another takes both from a Slurm environment whose
compressed node list expands to loopback addresses.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.client import AsyncClient, RequestFailed
from greenroom.config import KVConfig, ModelConfig
from greenroom.models import ModelRunner, PlanExecutor

pytestmark = pytest.mark.slow

PROMPTS = [[1, 5, 9, 200, 3], list(range(10, 47)), list(range(10, 30)) + [7, 7, 7]]
MAX_TOKENS = 8


def single_rank_tokens() -> list[list[int]]:
    runner = ModelRunner(ModelConfig(), KVConfig(num_blocks=64), None, "cpu")
    out = []
    for i, prompt in enumerate(PROMPTS):
        ex = PlanExecutor(runner)
        blocks = list(range(1, 5))
        new = NewSequence(
            request_id=f"r{i}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=MAX_TOKENS),
            num_cached_tokens=0,
            block_ids=blocks,
        )
        plan = StepPlan(iteration=0, new=[new], steps=[SequenceStep(f"r{i}", len(prompt))])
        tokens = []
        for step in range(MAX_TOKENS):
            tokens.append(ex.execute(plan).sampled[0].token_id)
            plan = StepPlan(iteration=step + 1, steps=[SequenceStep(f"r{i}", 1)])
        out.append(tokens)
    return out


NODE_ARGS = ["--tp-size", "2", "--num-blocks", "128", "--log-level", "warning", "--no-http"]


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the store and the rank bus)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def launch(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        base.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", "greenroom.cli", "launch", *NODE_ARGS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=base | (env or {}),
    )


def wait_line(proc: subprocess.Popen, pattern: str, seen: list[str]) -> re.Match:
    for line in proc.stdout:
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"exited with {proc.wait()} before {pattern!r}: {''.join(seen)}")


async def check_tokens(address: str, again: bool = False, **client_keys: str) -> None:
    """Concurrent requests (chunked prefill beside decodes) give one rank's tokens; with
    ``again``, a repeat of the longest prompt reuses its cached prefix and still does."""
    expected = single_rank_tokens()
    async with AsyncClient(address, timeout=60, **client_keys) as client:
        info = await client.server_info()
        assert "tp2" in info.device
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        results = await asyncio.gather(*(client.generate(p, sampling) for p in PROMPTS))
        assert [r.token_ids for r in results] == expected
        if again:
            repeat = await client.generate(PROMPTS[1], sampling)
            assert repeat.token_ids == expected[1]
            assert repeat.metrics.num_cached_tokens > 0


def run_two_nodes(
    node0: tuple[list[str], dict], node1: tuple[list[str], dict], **client_keys: str
) -> list[str]:
    head = launch(["--port", "0", *node0[0]], node0[1])
    agent = launch(node1[0], node1[1])
    out0: list[str] = []
    out1: list[str] = []
    try:
        address = wait_line(head, r"clients connect to (\S+)", out0).group(1)
        asyncio.run(check_tokens(address, **client_keys))
        head.send_signal(signal.SIGTERM)
        assert head.wait(timeout=30) == 0
        assert agent.wait(timeout=30) == 0  # the head's shutdown stops the agent
        out1 += agent.stdout.readlines()
    finally:
        for p in (head, agent):
            if p.poll() is None:
                p.kill()
    return out0 + out1


def test_two_nodes_from_torchrun_env_and_flags() -> None:
    port = free_port_pair()
    torchrun = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port - 1),  # greenroom's store goes one above torchrun's port
    }
    flags = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1"]
    out = run_two_nodes(([], torchrun), ([*flags, "--master-port", str(port)], {}))
    text = "".join(out)
    assert "launch (torchrun): node 0 of 2" in text and "launch (flags): node 1 of 2" in text
    assert "node 1: 1(pp0 cp0 tp1)" in text


def curve_flags(tmp_path: Path) -> tuple[list[list[str]], dict[str, str]]:
    """Each node's CURVE flags (its own pair, one peers directory holding both nodes' public
    keys, node 0's as HOST.key) and the client's keys."""
    from greenroom.bus.security import make_key_pair

    peers = tmp_path / "peers"
    pairs = {n: make_key_pair(tmp_path / n, n) for n in ("node0", "node1", "client")}
    peers.mkdir()
    (peers / "127.0.0.1.key").write_bytes(pairs["node0"][0].read_bytes())
    (peers / "node1.key").write_bytes(pairs["node1"][0].read_bytes())
    flags = [
        ["--curve-secret-key", str(pairs[n][1]), "--curve-authorized-keys", str(pairs["client"][0])]
        + ["--curve-peer-keys", str(peers)]
        for n in ("node0", "node1")
    ]
    client = {"server_key": str(pairs["node0"][0]), "client_key": str(pairs["client"][1])}
    return flags, client


def test_two_nodes_from_a_slurm_env_with_curve_on_the_rank_bus(tmp_path: Path) -> None:
    port = free_port_pair()
    flags, client_keys = curve_flags(tmp_path)
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",  # expands to loopback; node 0 is the first
        "MASTER_PORT": str(port),
    }
    nodes = [
        (flags[n], slurm | {"SLURM_PROCID": str(n), "SLURM_LOCALID": "0", "SLURM_NODEID": str(n)})
        for n in (0, 1)
    ]
    text = "".join(run_two_nodes(nodes[0], nodes[1], **client_keys))
    assert "launch (slurm): node 0 of 2, master 127.0.0.1" in text
    assert "launch (slurm): node 1 of 2" in text


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


async def stream_until_error(address: str, prompt: list[int]) -> BaseException | None:
    async with AsyncClient(address, timeout=60) as client:
        try:
            await client.generate(prompt, SamplingParams(max_tokens=1900, ignore_eos=True))
        except RequestFailed as exc:
            return exc
    return None


def test_kill_9_of_a_rank_fails_its_requests_restarts_the_group_then_exits_past_the_limit(
    tmp_path,
) -> None:
    stderr = (tmp_path / "stderr").open("w+")  # a pipe nobody reads would fill and block
    serve = subprocess.Popen(
        [sys.executable, "-m", "greenroom.cli", "serve", "--port", "0", *NODE_ARGS]
        + ["--max-model-len", "2048", "--max-num-tokens", "16", "--set", "engine_max_restarts=1"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    seen: list[str] = []
    try:
        address = wait_line(serve, r"clients connect to (\S+)", seen).group(1)

        async def kill_mid_stream() -> None:
            await check_tokens(address, again=True)  # `serve --tp-size 2` gives tp 1's tokens
            streams = [asyncio.ensure_future(stream_until_error(address, p)) for p in PROMPTS]
            await asyncio.sleep(1.0)
            workers = [p for p in children(serve.pid) if "parallel.worker" in _cmdline(p)]
            assert len(workers) == 2
            killed_at = time.monotonic()
            os.kill(workers[1], signal.SIGKILL)
            errors = await asyncio.wait_for(asyncio.gather(*streams), 30)
            assert all(isinstance(e, RequestFailed) for e in errors), errors
            assert time.monotonic() - killed_at < 10
            await check_tokens(address)  # the group restarted: correct tokens again

        asyncio.run(kill_mid_stream())
        workers = [p for p in children(serve.pid) if "parallel.worker" in _cmdline(p)]
        os.kill(workers[0], signal.SIGKILL)  # the second crash in a minute: past the limit
        assert serve.wait(timeout=60) == 1
        stderr.seek(0)
        assert "restart limit" in stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
