"""The replay tool against a real node (embedded tiny model, loopback tcp): the CLI in its own
thread with its own event loop, exactly as a user runs it; outputs run to max_tokens and the
server's KV reuse counters reach the report."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path

import pytest

from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node
from greenroom.replay import cli as replay_cli
from greenroom.replay import load_trace, replay
from greenroom.replay.readers import TraceRow
from greenroom.replay.trace import build_requests

pytestmark = pytest.mark.slow


@pytest.fixture
async def node():
    cfg = load_config(overrides={"port": 0, "kv.num_blocks": 512, "log_level": "warning"})
    node = await Node.start(cfg)
    try:
        yield node
    finally:
        await node.stop()


async def test_cli_replays_the_bundled_slice(node, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with resources.as_file(
        resources.files("greenroom").joinpath("data/azure_conv_slice.csv")
    ) as trace:
        argv = [
            str(trace),
            "--server",
            node.address,
            "--max-requests",
            "16",
            "--time-scale",
            "0.05",
            "--max-input-len",
            "96",
            "--max-output-len",
            "6",
            "--slo",
            "ttft=60000,tpot=60000",
            "--out",
            str(out),
            "--quiet",
        ]
        code = await asyncio.to_thread(replay_cli.main, argv)
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_sent"] == report["num_completed"] == 16, report["failures"]
    assert report["num_failed"] == 0 and report["num_short_outputs"] == 0
    assert report["run"]["vocab_size"] == node.info.vocab_size
    assert report["run"]["max_model_len"] == node.info.max_model_len
    records = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert report["total_output_tokens"] == sum(r["max_tokens"] for r in records)
    assert all(r["metrics"]["num_prompt_tokens"] == r["prompt_tokens"] for r in records)
    assert report["goodput"]["num_good"] == 16
    assert (out / "throughput.png").exists()


async def test_shared_hash_ids_hit_the_prefix_cache(node) -> None:
    # three requests over the same two 512-token blocks, spaced so each finds the last one's
    rows = [TraceRow(0.4 * i, 1030, 3, [5, 6, 7]) for i in range(3)]
    rows.append(TraceRow(1.2, 700, 3, [8, 9]))
    async with AsyncClient(node.address, timeout=120) as client:
        info = await client.server_info()
        requests = build_requests(
            rows, vocab_size=info.vocab_size, max_model_len=info.max_model_len
        )
        report = await replay(requests, client, time_scale=1.0)
    assert report.num_completed == 4, report.failures
    assert report.prefix.reused_blocks > 0
    assert report.prefix.hit_rate is not None and report.prefix.hit_rate > 0.3
    assert report.prefix.cached_tokens >= 2 * 1024


async def test_overlong_requests_are_clipped_not_rejected(node, tmp_path: Path) -> None:
    limit = node.info.max_model_len
    trace = tmp_path / "long.csv"
    trace.write_text(f"input_length,output_length\n{limit + 100},4\n10,{limit}\n")
    async with AsyncClient(node.address, timeout=120) as client:
        requests = load_trace(
            trace, vocab_size=node.info.vocab_size, max_model_len=limit, max_output_len=None
        )
        requests = [r for r in requests if r.max_tokens <= 4]  # the long output is slow on CPU
        report = await replay(requests, client)
    assert report.num_clipped == 1 and report.num_completed == 1, report.failures
