"""HTTP streaming against the native client on one node, in one run.

The node runs as `greenroom serve` in its own process with its HTTP server processes; this
process drives it with `c` concurrent streams (all sent at once, private prompts, exactly
`max_tokens` each), first through the native client, then through `POST /v1/completions`
with SSE, at each concurrency. Reported per side: output tokens/s over the wall time of the
wave and TTFT percentiles; the comparison: HTTP / native tokens/s and the added TTFT p50.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from greenroom.bench.sse_client import LeanSSEClient
from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.replay.tokens import request_tokens


@dataclass(frozen=True)
class Wave:
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    output_tokens: int
    seconds: float
    failed: int

    def to_dict(self) -> dict:
        return asdict(self)


async def wave(client, prompts: Sequence[list[int]], max_tokens: int) -> Wave:
    """All prompts at once through `client.stream`; tokens/s over the whole wave."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    ttfts: list[float] = []
    counts: list[int] = []
    failed = 0

    async def one(ids: list[int]) -> None:
        nonlocal failed
        sent = time.perf_counter()
        n = 0
        try:
            async for delta in client.stream(ids, sampling):
                if delta.token_ids and n == 0:
                    ttfts.append(time.perf_counter() - sent)
                n += len(delta.token_ids)
        except Exception:
            failed += 1
        counts.append(n)

    start = time.perf_counter()
    await asyncio.gather(*(one(list(p)) for p in prompts))
    seconds = time.perf_counter() - start
    ms = np.asarray(ttfts or [float("nan")]) * 1000.0
    return Wave(
        tokens_per_s=sum(counts) / seconds,
        ttft_p50_ms=float(np.percentile(ms, 50)),
        ttft_p90_ms=float(np.percentile(ms, 90)),
        output_tokens=sum(counts),
        seconds=seconds,
        failed=failed,
    )


class ServedNode:
    """`greenroom serve` with its HTTP API, in a child process on free ports."""

    def __init__(self, serve_args: Sequence[str]) -> None:
        cmd = [sys.executable, "-m", "greenroom.cli", "serve", "--port", "0", "--http-port", "0"]
        cmd += ["--log-level", "warning", *serve_args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self.address = self.url = ""
        deadline = time.monotonic() + 600
        while not (self.address and self.url) and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"greenroom serve exited with status {self.proc.returncode}")
            if m := re.search(r"clients connect to (tcp://\S+)", line):
                self.address = m.group(1)
            if m := re.search(r"HTTP API at (http://\S+)/v1", line):
                self.url = m.group(1)
        if not self.url:
            self.stop()
            raise RuntimeError("greenroom serve did not report its addresses")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def compare(
    node: ServedNode,
    concurrencies: Sequence[int],
    prompt_len: int,
    max_tokens: int,
    vocab_size: int,
) -> dict:
    out: dict = {}
    http = LeanSSEClient(node.url)
    async with AsyncClient(node.address, timeout=600) as native:
        warm = [request_tokens(10**6 + i, prompt_len, vocab_size).tolist() for i in range(8)]
        await wave(native, warm, 4)
        await wave(http, warm, 4)
        seed = 0
        for c in concurrencies:
            waves = {}
            for side, client in (("native", native), ("http", http)):
                seed += 1  # fresh prompts per wave: no prefix reuse between them
                prompts = [
                    request_tokens(i, prompt_len, vocab_size, seed).tolist() for i in range(c)
                ]
                waves[side] = await wave(client, prompts, max_tokens)
            n, h = waves["native"], waves["http"]
            out[str(c)] = {
                "native": n.to_dict(),
                "http": h.to_dict(),
                "tokens_per_s_ratio": h.tokens_per_s / n.tokens_per_s if n.tokens_per_s else None,
                "added_ttft_p50_ms": h.ttft_p50_ms - n.ttft_p50_ms,
            }
    return out
