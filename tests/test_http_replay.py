"""`greenroom replay --api openai` against greenroom's own HTTP server reports what a replay
through the native client reports on the same slice."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from http_fixtures import NodeThread, start_http

from greenroom.replay import cli as replay_cli

pytestmark = pytest.mark.slow


def replay(server: str, out, *extra: str) -> dict:
    trace = resources.files("greenroom") / "data" / "azure_conv_slice.csv"
    args = replay_cli.build_parser().parse_args(
        [
            str(trace),
            "--server",
            server,
            "--max-requests",
            "24",
            "--max-input-len",
            "48",
            "--max-output-len",
            "6",
            "--time-scale",
            "0",
            "--no-plots",
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert replay_cli.run(args) == 0
    return json.loads((out / "report.json").read_text())


def records(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["index"])


def test_openai_replay_matches_the_native_replay(tmp_path) -> None:
    node = NodeThread({"kv.num_blocks": 512})
    try:
        server = start_http(node.node, None)
        try:
            native = replay(node.node.address, tmp_path / "native")
            http = replay(server.url, tmp_path / "http", "--api", "openai")
        finally:
            server.stop()
    finally:
        node.stop()
    assert http["run"]["api"] == "openai" and native["run"]["api"] == "greenroom"
    assert http["run"]["model"] == native["run"]["model"]
    assert http["run"]["max_model_len"] == native["run"]["max_model_len"]
    for key in (
        "num_sent",
        "num_completed",
        "num_failed",
        "total_input_tokens",
        "total_output_tokens",
    ):
        assert http[key] == native[key], key
    assert http["num_completed"] == 24 and http["failures"] == {}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert http[key]["count"] == native[key]["count"], key
    # tokens that arrive together (merged chunks when a reader lags) have no gap between them
    assert 0 < http["itl_ms"]["count"] <= http["total_output_tokens"] - http["num_completed"]
    assert http["prefix"]["prompt_tokens"] == native["prefix"]["prompt_tokens"]
    n_rows, h_rows = records(tmp_path / "native"), records(tmp_path / "http")
    assert [(r["prompt_tokens"], r["output_tokens"], r["finish_reason"]) for r in h_rows] == [
        (r["prompt_tokens"], r["output_tokens"], r["finish_reason"]) for r in n_rows
    ]
