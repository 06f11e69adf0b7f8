"""The CPU path needs no triton (a runtime dependency no more): a node serves with the module
unimportable, and no Triton kernel module of greenroom.kernels is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as on a machine without it
import asyncio
from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node

async def main():
    cfg = load_config(overrides={"port": 0, "kv.num_blocks": 64, "log_level": "warning"})
    node = await Node.start(cfg)
    try:
        async with AsyncClient(node.address) as client:
            out = await client.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    finally:
        await node.stop()
    assert len(out.token_ids) == 4, out
    loaded = [m for m in sys.modules if m.startswith("greenroom.kernels.triton_")]
    assert not loaded, loaded
    print("served without triton")

asyncio.run(main())
"""


def test_cpu_node_serves_without_triton() -> None:
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "served without triton" in res.stdout
