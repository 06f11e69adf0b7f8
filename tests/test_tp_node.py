"""A tensor-parallel node end to end: `greenroom serve --tp-size 2` on CPU ranks (gloo)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest

from greenroom.bus.messages import NewSequence, SamplingParams, SequenceStep, StepPlan
from greenroom.client import AsyncClient
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


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "greenroom.cli",
            "serve",
            "--port",
            "0",
            "--no-http",
            "--log-level",
            "warning",
        ]
        + list(args),
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        found = re.search(r"clients connect to (\S+)", line)
        if found:
            return proc, found.group(1)
    raise AssertionError(f"serve exited with {proc.wait()} before it was ready")


async def test_serve_tp2_gives_the_single_rank_tokens() -> None:
    expected = single_rank_tokens()
    proc, address = start_serve("--tp-size", "2", "--num-blocks", "64", "--max-num-tokens", "16")
    try:
        async with AsyncClient(address, timeout=60) as client:
            info = await client.server_info()
            assert "tp2" in info.device
            sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
            # concurrent: chunked prefill beside decodes; the third shares the second's prefix
            results = await asyncio.gather(*(client.generate(p, sampling) for p in PROMPTS))
            assert [r.token_ids for r in results] == expected
            again = await client.generate(PROMPTS[1], sampling)  # prefix reuse
            assert again.token_ids == expected[1]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
