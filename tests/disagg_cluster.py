"""Disaggregated test clusters: context, generation and router nodes on the embedded tiny
model, in this process (two NIXL agents of one process still move the KV through UCX) or, for
a node a test kills, in a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from greenroom.bus.messages import KVStats
from greenroom.config import load_config
from greenroom.node import Node
from greenroom.router import RouterNode

TPB = 16


def synthetic(seed: int, n: int) -> list[int]:
    """n token ids in [3, 500) of the tiny vocabulary, different for each seed."""
    return [(seed * 7919 + i * 131 + (i * i) % 97) % 497 + 3 for i in range(n)]


def overrides(role: str, **extra) -> dict:
    base = {
        "port": 0,
        "role": role,
        "kv.num_blocks": 96,
        "kv.tokens_per_block": TPB,
        "scheduler.max_num_tokens": 128,
        "kv_transfer.timeout_s": 15.0,  # generous: CI machines may be loaded
        "kv_transfer.lease_s": 30.0,
        "log_level": "warning",
    }
    base.update(extra)
    return base


async def start(role: str, **extra) -> Node:
    return await Node.start(load_config(overrides=overrides(role, **extra)))


async def start_router(context: list[str], generation: list[str], **extra) -> RouterNode:
    cfg = load_config(
        overrides={
            "port": 0,
            "role": "router",
            "log_level": "warning",
            "router.context_nodes": context,
            "router.generation_nodes": generation,
            "router.node_timeout_s": 1.0,
            **extra,
        }
    )
    return await RouterNode.start(cfg, wait_s=30.0)


async def no_leaks(*nodes: Node, timeout: float = 30.0) -> list[KVStats]:
    """Every block of every node back in the pool (leases included), within ``timeout``."""
    return [await n.wait_blocks_free(timeout) for n in nodes]


@dataclass
class Cluster:
    context: list[Node]
    generation: list[Node]
    router: RouterNode
    children: list[ChildNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.router.address


@contextlib.asynccontextmanager
async def cluster(
    mode: str = "async", n_context: int = 1, n_generation: int = 1, **extra
) -> AsyncIterator[Cluster]:
    ctx = [await start("context", **extra) for _ in range(n_context)]
    gen = [
        await start("generation", **{"kv_transfer.mode": mode, **extra})
        for _ in range(n_generation)
    ]
    router = await start_router([n.address for n in ctx], [n.address for n in gen])
    try:
        yield Cluster(ctx, gen, router)
    finally:
        await router.stop()
        for n in ctx + gen:
            await n.stop()


class ChildNode:
    """A node in a child process (``greenroom serve``), for tests that kill one."""

    def __init__(self, role: str, **extra) -> None:
        args = [sys.executable, "-m", "greenroom.cli", "serve"]
        for key, value in overrides(role, **extra).items():
            args += ["--set", f"{key}={value}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.address = ""

    async def ready(self, timeout: float = 60.0) -> str:
        """Wait for the line naming the client address (NIXL logs to stdout as well)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            line = await asyncio.wait_for(
                loop.run_in_executor(None, self.proc.stdout.readline), max(0.1, end - loop.time())
            )
            if not line:
                raise RuntimeError(f"the child node exited ({self.proc.poll()}) before serving")
            m = re.search(r"clients connect to (\S+)", line)
            if m is not None:
                self.address = m.group(1)
                # nothing reads stdout from here on: drain it so the child never blocks on it
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return self.address

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
