"""SM disaggregation with adaptive routing on a GPU: the threshold measured on the context
partition, short prompts prefilled in generation steps (on the whole GPU while the context
engine idles, on the partition while it runs), long ones handed off; greedy outputs equal
mixed mode's. Skips without CUDA (and without cuda.bindings for the partitions)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from greenroom.bus.messages import SamplingParams
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def node_config(sm: bool, **overrides):
    base = {
        "port": 0,
        "log_level": "warning",
        "model.device": "cuda",
        "model.path": "random:small",  # float32
        "model.max_model_len": 1024,
        "kv.num_blocks": 512,
        "kv.enable_prefix_reuse": False,
        "scheduler.max_num_tokens": 256,
        "scheduler.max_batch_size": 32,
        "sm_disagg.enabled": sm,
        "sm_disagg.context_sm_percent": 0.3,
        "sm_disagg.context_max_num_tokens": 512,
    }
    base.update(overrides)
    return load_config(overrides=base)


def workload() -> list[tuple[list[int], int]]:
    rng = random.Random(5)
    lengths = [4, 700, 20, 300, 9, 900, 60, 2, 450, 33] * 2
    return [([rng.randrange(3, 4000) for _ in range(n)], 6 + i % 7) for i, n in enumerate(lengths)]


async def serve(cfg, requests) -> tuple[list[list[int]], Node, dict]:
    node = await Node.start(cfg)
    try:
        async with AsyncClient(node.address, timeout=120) as client:
            outs = await asyncio.gather(
                *(
                    client.generate(p, SamplingParams(max_tokens=m, ignore_eos=True))
                    for p, m in requests
                )
            )
        stats = await node.scheduler_stats()
    finally:
        await node.stop()
    return [list(o.token_ids) for o in outs], node, stats


async def test_adaptive_routing_on_partitions_keeps_greedy_outputs() -> None:
    pytest.importorskip("cuda.bindings")
    requests = workload()
    mixed, _, _ = await serve(node_config(sm=False), requests)
    adaptive, node, stats = await serve(node_config(sm=True), requests)
    threshold = node.cfg.sm_disagg.routing_threshold_tokens
    # measured: ride_knee_multiple knees of a ladder from 16 tokens up to the context budget
    # (a knee past the ladder reads as twice its largest size)
    multiple = node.cfg.sm_disagg.ride_knee_multiple
    assert 16 * multiple <= threshold <= 2 * 512 * multiple
    assert adaptive == mixed
    long = sum(1 for p, _ in requests if len(p) >= threshold)
    assert stats["handoffs"] >= long
    assert stats.get("prompts_in_generation", 0) == len(requests) - stats["handoffs"]
    pinned, _, pinned_stats = await serve(
        node_config(sm=True, **{"sm_disagg.routing_threshold_tokens": 100}), requests
    )
    assert pinned == mixed
    assert pinned_stats["handoffs"] >= sum(1 for p, _ in requests if len(p) >= 100)
    assert pinned_stats["prompts_in_generation"] >= 1
