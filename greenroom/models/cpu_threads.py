"""How many intra-op threads torch gets when the engine runs on the CPU.

torch's default (one per core) makes the engine's thread pool fight the node's event loop for
the same cores: on a 2-core machine with a little other load, TTFT p50 went from 25 ms with one
thread to 2.4 s with the default, and spinning pool threads stall whenever a core is taken.
The engine keeps one core free for the loop (frontend, scheduler, KV manager) and takes the
rest of the cores this process may run on.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def engine_cpu_threads(requested: int = 0, cores: int | None = None) -> int:
    """``requested`` when set (> 0); otherwise all cores but one, and at least one."""
    if requested > 0:
        return requested
    return max(1, (cores if cores is not None else available_cores()) - 1)


def use_engine_cpu_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads for a CPU engine; returns the count."""
    threads = engine_cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads
