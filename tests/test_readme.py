"""README.md runs as written: every ```bash and ```python block is executed from a directory laid
out like a clone (greenroom/, examples/, scripts/), with the default port 7700 swapped for a
free one. Python blocks run against a node started here on loopback. A block may be skipped
only with a `<!-- readme-test: skip: REASON -->` line right above it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from greenroom.config import NodeConfig, load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>.+?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    heading: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.lang}@{self.line}({self.heading})"


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = FENCE.match(line)
        if m:
            start = i
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            prev = next((x for x in reversed(lines[:start]) if x.strip()), "")
            skip = SKIP.search(prev)
            blocks.append(
                Block(
                    m["lang"], "\n".join(body) + "\n", start + 1, heading, skip and skip["reason"]
                )
            )
        i += 1
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.lang in ("bash", "python")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def clone(tmp_path: Path, port: int) -> tuple[Path, dict[str, str]]:
    """A working directory laid out like the root of a clone (examples/ copied with the
    default port swapped), and an environment whose `greenroom` and `python` are this
    interpreter's."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("greenroom", "scripts"):
        (work / name).symlink_to(REPO / name)
    (work / "examples").mkdir()
    for f in (REPO / "examples").iterdir():
        text = f.read_text().replace("7700", str(port)).replace("8000", str(free_port()))
        (work / "examples" / f.name).write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("greenroom", "-m greenroom.cli"), ("python", "")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        shim.chmod(0o755)
    # the tree under test is installed already: a block's `pip install -e .` has nothing to do
    pip = bin_dir / "pip"
    pip.write_text('#!/bin/sh\necho "pip $*: the tree under test is installed already"\n')
    pip.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return work, env


def run_in_session(cmd: list[str], cwd: Path, env: dict, timeout: float):
    """Run in a fresh process group, killed whole at the end (a background node a failed
    block left behind included); output goes to files, so no leftover holds a pipe open."""
    with (cwd / "stdout.txt").open("w") as out, (cwd / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def start_node(cwd: Path, env: dict, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["greenroom", "serve", "--port", str(port), "--no-http", "--log-level", "warning"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "clients connect to" in line:
            return proc
        if proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"greenroom serve did not start: {proc.stderr.read()}")


def test_every_block_runs_or_says_why_not() -> None:
    assert len(BLOCKS) >= 6
    skipped = [b for b in BLOCKS if b.skip_reason]
    assert all(len(b.skip_reason) > 10 for b in skipped)
    assert len(skipped) <= 6, [b.name for b in skipped]
    joined = "".join(b.code for b in BLOCKS)
    assert "shared/traces" not in README.read_text()
    for needle in ("greenroom demo", "greenroom replay", "AsyncClient", "--quick"):
        assert needle in joined


def test_sample_config_loads_and_names_every_section() -> None:
    cfg = load_config(REPO / "examples" / "node.yaml")
    assert isinstance(cfg, NodeConfig) and cfg.port == 7700
    import yaml

    data = yaml.safe_load((REPO / "examples" / "node.yaml").read_text())
    for section in ("model", "kv", "scheduler", "parallel", "sm_disagg", "http", "router"):
        assert isinstance(data.get(section), dict), section


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.skip_reason], ids=lambda b: b.name)
def test_readme_block_runs_as_written(block: Block, clone, port: int) -> None:
    work, env = clone
    code = block.code.replace("7700", str(port)).replace("8000", str(free_port()))
    if block.lang == "bash":
        rc, out, err = run_in_session(["bash", "-euo", "pipefail", "-c", code], work, env, 280)
        assert rc == 0, f"{block.name} failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}"
        for report in work.glob("reports/*/report.json"):  # every replay finished clean
            data = json.loads(report.read_text())
            assert data["num_failed"] == 0 and data["num_unsent"] == 0, data["failures"]
        if "greenroom demo" in code:  # the table and the files written; no JSON dump
            assert "requests sent" in out and "TTFT" in out and len(out) < 4000
            assert out.strip().splitlines()[-1].startswith("wrote ")
        if "--quick" in code:
            result = json.loads(out.strip().splitlines()[-1])
            assert result.get("lost_requests", 0) == 0
        return
    node = start_node(work, env, port)
    try:
        script = work / "snippet.py"
        script.write_text(code)
        rc, out, err = run_in_session([sys.executable, str(script)], work, env, 120)
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    assert rc == 0, f"{block.name} failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}"
    if "abort" in code:
        assert out.strip().splitlines()[-1] == "last delta: abort"
