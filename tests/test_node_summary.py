"""The node logs a one-line summary every log_stats_interval_s while it is busy."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
import structlog

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.logging import configure_logging
from greenroom.node import Node

pytestmark = pytest.mark.slow


@pytest.fixture
def stream():
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    yield buf
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_greenroom", False)]:
        root.removeHandler(handler)
    structlog.reset_defaults()


async def test_summary_lines_while_busy(stream) -> None:
    cfg = load_config(overrides={"port": 0, "kv.num_blocks": 64, "log_stats_interval_s": 0.2})
    node = await Node.start(cfg)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            sampling = SamplingParams(max_tokens=40, ignore_eos=True)
            await asyncio.gather(*(client.generate([1, 2, 3, 4 + i], sampling) for i in range(4)))
            await node.wait_blocks_free()
            stats = await client.node_stats()
            assert stats.generation_tokens == 160 and stats.prompt_tokens == 16
            assert stats.running == stats.waiting == 0
            assert stats.kv_free_blocks == stats.kv_total_blocks > 0
        await asyncio.sleep(0.5)
    finally:
        await node.stop()
    summaries = [
        r
        for r in (json.loads(line) for line in stream.getvalue().splitlines() if line.strip())
        if r["event"] == "node summary"
    ]
    assert summaries, stream.getvalue()[-2000:]
    keys = {"prompt_tokens_per_s", "generation_tokens_per_s", "running", "waiting", "kv_use_pct"}
    assert all(keys <= r.keys() and r["level"] == "info" for r in summaries)
    assert sum(r["generation_tokens_per_s"] for r in summaries) > 0
    assert summaries[-1]["running"] == 0  # the line after the work ended says so
