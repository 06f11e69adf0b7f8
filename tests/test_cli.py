"""The `greenroom` console script as a user runs it: help, serve + SIGTERM, replay, demo."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from greenroom.bus.messages import SamplingParams
from greenroom.client import Client
from greenroom.replay.bundled import AZURE_CONV, MOONCAKE, OPENORCA, bundled_trace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "greenroom.cli"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_explains_every_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in ("serve", "launch", "replay", "demo"):
        assert cmd in top.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0, sub.stderr
    serve = run_cli("serve", "--help").stdout
    for flag in ("--model", "--max-num-tokens", "--sm-disagg", "--set", "--config"):
        assert flag in serve


def test_bad_config_fails_with_a_clear_message() -> None:
    out = run_cli("serve", "--max-num-tokens", "0")
    assert out.returncode == 2
    assert "scheduler.max_num_tokens = 0 is invalid" in out.stderr
    out = run_cli("serve", "--set", "kv.bogus=1")
    assert out.returncode == 2 and "bogus" in out.stderr


@pytest.fixture(scope="module")
def server():
    """`greenroom serve` in its own process on a free port."""
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            "0",
            "--http-port",
            "0",
            "--num-blocks",
            "1024",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    address = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"clients connect to (tcp://\S+)", line)
        if m:
            address = m.group(1)
            break
        if proc.poll() is not None:
            break
    if address is None:
        proc.kill()
        raise AssertionError(f"server did not start: {proc.stderr.read()}")
    yield proc, address
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("azure", ["--time-scale", "0.02"]),
        ("mooncake", ["--time-scale", "0.002"]),
        ("lengths", ["--rate", "100"]),
    ],
)
def test_replay_200_requests_of_each_format(server, tmp_path, name, extra) -> None:
    _, address = server
    trace = bundled_trace({"azure": AZURE_CONV, "mooncake": MOONCAKE, "lengths": OPENORCA}[name])
    out = tmp_path / "report"
    res = run_cli(
        "replay",
        str(trace),
        "--server",
        address,
        "--max-requests",
        "200",
        "--max-input-len",
        "128",
        "--max-output-len",
        "8",
        "--out",
        str(out),
        "--quiet",
        *extra,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["num_sent"] == 200
    assert report["num_sent"] == report["num_completed"] + report["num_failed"]
    assert report["num_completed"] == 200, report["failures"]
    assert (out / "report.json").is_file() and (out / "latency_cdf.png").is_file()


def test_serve_answers_then_exits_cleanly_on_sigterm(server) -> None:
    proc, address = server
    with Client(address, timeout=60) as client:
        result = client.generate([1, 2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(result.token_ids) == 5 and result.finish_reason == "length"
        info = client.server_info()
        assert info.model_name and info.vocab_size == 512
    url = re.search(r"HTTP API at (http://\S+)/v1", proc.stdout.readline()).group(1)
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in proc.stdout.read()
    with pytest.raises(httpx.ConnectError):  # the HTTP server stopped with the node
        httpx.get(url + "/health", timeout=5)
