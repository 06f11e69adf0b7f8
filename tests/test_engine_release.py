"""A stopped node leaves nothing of its engines alive: weights, KV pool and graphs go with them
(on a GPU the process's memory returns to its baseline; the GPU case runs there)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node

ENGINES = {False: ("engine",), True: ("context-engine", "generation-engine")}


def node_config(sm: bool, device: str = "cpu"):
    return load_config(
        overrides={
            "port": 0,
            "log_level": "warning",
            "engine_host": "thread",
            "model.device": device,
            "model.path": "random:small",
            "model.max_model_len": 256,
            "kv.num_blocks": 64,
            "sm_disagg.enabled": sm,
        }
    )


async def start_serve_stop(sm: bool, device: str = "cpu") -> tuple[Node, list[weakref.ref]]:
    """Start a node, run a request, stop it; the stopped node (a caller may keep it) and weak
    references to its engines' objects."""
    node = await Node.start(node_config(sm, device))
    try:
        async with AsyncClient(node.address) as client:
            out = await client.generate([5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
            assert len(out.token_ids) == 4
        refs = []
        for name in ENGINES[sm]:
            engine = node.runtime.cell(name).actor
            refs += [weakref.ref(engine.executor), weakref.ref(engine.executor.runner)]
            refs.append(weakref.ref(engine.executor.runner.kv_pool))
        assert gc.get_freeze_count() > 0, "a running node keeps its start-up heap frozen"
    finally:
        await node.stop()
    return node, refs


@pytest.mark.parametrize("sm", [False, True], ids=["mixed", "sm"])
async def test_engine_objects_are_collected_after_stop(sm: bool) -> None:
    _node, refs = await start_serve_stop(sm)  # the stopped node itself stays referenced
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"still alive after stop: {[type(a).__name__ for a in alive]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_gpu_memory_returns_to_baseline_after_each_stop() -> None:
    """SM and mixed nodes started and stopped three times each in one process: after every
    stop the allocated memory is back at the baseline (give or take the matmul library's
    per-stream workspaces, made once), so it never grows from one node to the next."""
    gc.collect()
    baseline = torch.cuda.memory_allocated()
    after: dict[bool, list[int]] = {True: [], False: []}
    for _ in range(3):
        for sm in (True, False):
            _node, refs = await start_serve_stop(sm, "cuda")
            gc.collect()
            assert all(r() is None for r in refs), sm
            after[sm].append(torch.cuda.memory_allocated())
    slack = 256 << 20
    for sm, values in after.items():
        assert max(values) <= baseline + slack, (sm, baseline, values)
        assert max(values) - min(values) <= 64 << 20, (sm, values)
