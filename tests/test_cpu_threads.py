"""A CPU engine takes every core but one for torch, leaving one to the node's event loop."""

from __future__ import annotations

import asyncio
import threading

import torch

from greenroom.actors.engine import Engine
from greenroom.config import load_config
from greenroom.models.cpu_threads import available_cores, engine_cpu_threads


def test_thread_count_from_the_cores_given() -> None:
    assert engine_cpu_threads(0, cores=1) == 1
    assert engine_cpu_threads(0, cores=2) == 1
    assert engine_cpu_threads(0, cores=16) == 15
    assert engine_cpu_threads(3, cores=2) == 3  # an explicit count wins
    assert engine_cpu_threads() == max(1, available_cores() - 1)


def test_a_cpu_engine_sets_its_threads() -> None:
    """torch's thread count is per OS thread: checked on the thread that hosts the engine."""
    cfg = load_config(overrides={"model.device": "cpu", "model.cpu_threads": 1, "kv.num_blocks": 8})
    seen: list[int] = []

    def host() -> None:
        torch.set_num_threads(2)
        asyncio.run(Engine(cfg).on_start())
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=host)
    thread.start()
    thread.join()
    assert seen == [1]
