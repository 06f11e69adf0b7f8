"""Disaggregated serving measurements: KV transfer bandwidth through NIXL against a local copy
of the same bytes, and one context + one generation node against two mixed nodes on the same
replayed trace slice.

Transfer: a child process owns the context side (a KV pool registered with its NIXL agent, as
a context node's engine has it); this process reads a request's blocks into its own pool, as a
generation node's engine does. The baseline copies the same blocks between two pools of this
process (same memory kind). Block ids come in runs of ``run_blocks`` (a pool that has served a
while is fragmented), read once with runs merged into one descriptor each and once with one
descriptor per block.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import torch

from greenroom.bus.messages import KVAgentInfo, KVReceive, TransferHandle
from greenroom.kv.transfer import KVTransferAgent, block_runs
from greenroom.models.arch import ArchConfig


@dataclass(frozen=True)
class PoolShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: torch.dtype

    @classmethod
    def of(cls, arch: ArchConfig, tokens_per_block: int, dtype: torch.dtype) -> PoolShape:
        return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, tokens_per_block, dtype)

    def pool(self, num_blocks: int, device: str) -> torch.Tensor:
        shape = (
            num_blocks,
            self.num_layers,
            2,
            self.tokens_per_block,
            self.num_kv_heads,
            self.head_dim,
        )
        return torch.zeros(shape, dtype=self.dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem


def fragmented_blocks(num_blocks: int, run_blocks: int, seed: int) -> list[int]:
    """``num_blocks`` distinct ids in [1, num_blocks], in shuffled runs of ``run_blocks``."""
    runs = [
        list(range(s, min(s + run_blocks, num_blocks + 1)))
        for s in range(1, num_blocks + 1, run_blocks)
    ]
    random.Random(seed).shuffle(runs)
    return [b for run in runs for b in run]


def _context_side(
    shape: PoolShape, num_blocks: int, device: str, out: mp.Queue, stop: mp.Queue
) -> None:
    pool = shape.pool(num_blocks, device)
    pool.view(num_blocks, -1)[:] = (
        torch.arange(num_blocks, device=device).view(-1, 1).to(shape.dtype)
    )
    agent = KVTransferAgent(pool, "bench", name="bench-context")
    out.put(msgspec.structs.asdict(agent.info()))
    stop.get()
    agent.close()


@dataclass
class TransferResult:
    tokens: int
    bytes: int
    descriptors: int
    nixl_gbps: float
    nixl_per_block_gbps: float
    copy_gbps: float
    ratio: float  # merged-run NIXL read / local copy

    def to_dict(self) -> dict:
        return asdict(self)


def _read_s(agent: KVTransferAgent, h: TransferHandle, runs: list[tuple[int, int, int]]) -> float:
    """Seconds for one NIXL read of ``runs`` ((remote start, local start, blocks) each one
    descriptor), polled without sleeping, as the engine's sync mode waits."""
    bb, a = agent.block_bytes, agent.agent
    local = [(agent.pool.data_ptr() + ls * bb, n * bb, agent.device_id) for _, ls, n in runs]
    remote = [(h.pool_address + rs * bb, n * bb, h.device_id) for rs, _, n in runs]
    start = time.perf_counter()
    xfer = a.initialize_xfer(
        "READ",
        a.get_xfer_descs(local, agent.mem_type),
        a.get_xfer_descs(remote, h.mem_type),
        h.agent_name,
        b"bench",
    )
    state = a.transfer(xfer)
    while state == "PROC":
        state = a.check_xfer_state(xfer)
    if agent.mem_type == "VRAM":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    a.release_xfer_handle(xfer)
    if state != "DONE":
        raise RuntimeError(f"the NIXL read ended {state}")
    return elapsed


def _warm_up(
    agent: KVTransferAgent, h: TransferHandle, remote: list[int], local: list[int]
) -> None:
    """The first read loads the remote agent and connects (the engine's own path)."""
    deadline = time.time() + 60
    agent.start(
        KVReceive(
            request_id="warm", handle=h, remote_blocks=remote, local_blocks=local, deadline=deadline
        )
    )
    agent.wait(["warm"], deadline)
    (update,) = agent.poll()
    if update.state != "complete":
        raise RuntimeError(f"the first read ended {update.state}: {update.message}")


def transfer_bandwidth(
    shape: PoolShape,
    token_counts: list[int],
    device: str = "cpu",
    run_blocks: int = 8,
    repeats: int = 5,
) -> list[TransferResult]:
    tpb = shape.tokens_per_block
    most = max(-(-n // tpb) for n in token_counts)
    num_blocks = most + 1
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Queue()
    child = ctx.Process(
        target=_context_side, args=(shape, num_blocks, device, out, stop), daemon=True
    )
    child.start()
    try:
        info = _child_answer(out, child)
        pool = shape.pool(num_blocks, device)
        agent = KVTransferAgent(pool, "bench", name="bench-generation")
        src = shape.pool(num_blocks, device)  # the baseline's source, in this process
        results = []
        for n in token_counts:
            blocks = -(-n // tpb)
            remote = fragmented_blocks(blocks, run_blocks, seed=n)
            local = fragmented_blocks(blocks, run_blocks, seed=n + 1)
            handle = KVAgentInfo(**info).handle(
                "bench", remote, n, 0, tpb, tp_size=1, lease_deadline=time.time() + 600
            )
            runs = block_runs(remote, local)
            single = [(r, loc, 1) for r, loc in zip(remote, local, strict=True)]
            if n == token_counts[0]:
                _warm_up(agent, handle, remote, local)
            merged = min(_read_s(agent, handle, runs) for _ in range(repeats))
            per_block = min(_read_s(agent, handle, single) for _ in range(repeats))
            got = pool[local[0]].flatten()[0].item()
            if got != remote[0]:
                raise RuntimeError(f"read block {local[0]} holds {got}, expected {remote[0]}")
            ri = torch.tensor(remote, device=device)
            li = torch.tensor(local, device=device)
            copy = min(_copy_s(pool, src, li, ri, device) for _ in range(repeats + 1))
            nbytes = blocks * agent.block_bytes
            results.append(
                TransferResult(
                    tokens=n,
                    bytes=nbytes,
                    descriptors=len(runs),
                    nixl_gbps=nbytes / merged / 1e9,
                    nixl_per_block_gbps=nbytes / per_block / 1e9,
                    copy_gbps=nbytes / copy / 1e9,
                    ratio=copy / merged,
                )
            )
        agent.close()
        return results
    finally:
        stop.put("stop")
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _child_answer(out: mp.Queue, child, timeout_s: float = 600.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(
                    f"the context-side process died (exit {child.exitcode})"
                ) from None
    raise TimeoutError("the context-side process did not register its pool in time")


def _copy_s(
    dst: torch.Tensor, src: torch.Tensor, li: torch.Tensor, ri: torch.Tensor, device: str
) -> float:
    start = time.perf_counter()
    dst.index_copy_(0, li, src.index_select(0, ri))
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- serving


class LeastLoadedClient:
    """Two mixed nodes behind one replay: each request to the node with fewer in flight."""

    def __init__(self, clients: list[Any]) -> None:
        self.clients = clients
        self.load = [0] * len(clients)

    async def stream(self, prompt_token_ids=None, sampling=None, **kw):
        i = min(range(len(self.clients)), key=self.load.__getitem__)
        self.load[i] += 1
        try:
            async for delta in self.clients[i].stream(prompt_token_ids, sampling, **kw):
                yield delta
        finally:
            self.load[i] -= 1


def serving_summary(report) -> dict:
    g = report.goodput
    return {
        "completed": report.num_completed,
        "failed": report.num_failed,
        "goodput_rps": g.requests_per_s if g else None,
        "goodput_fraction": g.fraction_of_sent if g else None,
        "ttft_p99_ms": report.ttft_ms.p99,
        "ttft_p50_ms": report.ttft_ms.p50,
        "itl_p99_ms": report.itl_ms.p99,
        "tpot_p50_ms": report.tpot_ms.p50,
        "output_tokens_per_s": report.output_throughput,
    }


async def compare_serving(node_overrides: dict, requests, slo, time_scale: float) -> dict:
    """The same trace slice against 1 context + 1 generation node (router) and 2 mixed nodes."""
    from greenroom.client import AsyncClient
    from greenroom.config import load_config
    from greenroom.node import Node
    from greenroom.replay import replay
    from greenroom.router import RouterNode

    def cfg(role: str, **extra):
        return load_config(overrides={**node_overrides, "port": 0, "role": role, **extra})

    out = {}
    nodes = [await Node.start(cfg("mixed")) for _ in range(2)]
    try:
        clients = [AsyncClient(n.address, timeout=600) for n in nodes]
        report = await replay(requests, LeastLoadedClient(clients), time_scale=time_scale, slo=slo)
        for c in clients:
            await c.close()
        out["mixed_x2"] = serving_summary(report)
    finally:
        for n in nodes:
            await n.stop()
    ctx = await Node.start(cfg("context"))
    gen = await Node.start(cfg("generation"))
    router = await RouterNode.start(
        cfg(
            "router",
            **{"router.context_nodes": [ctx.address], "router.generation_nodes": [gen.address]},
        )
    )
    try:
        async with AsyncClient(router.address, timeout=600) as client:
            report = await replay(requests, client, time_scale=time_scale, slo=slo)
        out["context_generation"] = serving_summary(report)
        out["leaked_blocks"] = sum(
            s.total_blocks - s.free_blocks
            for s in [await ctx.wait_blocks_free(), await gen.wait_blocks_free()]
        )
    finally:
        await router.stop()
        await ctx.stop()
        await gen.stop()
    return out


def run_compare(node_overrides: dict, requests, slo, time_scale: float) -> dict:
    return asyncio.run(compare_serving(node_overrides, requests, slo, time_scale))
