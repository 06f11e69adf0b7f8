"""Per-step engine timings: where a decode step's time goes (host, GPU, waiting for a plan).

An engine records, per plan: the wall time of the step, the gap since its previous step ended
(the engine idles there unless the next plan was already queued), the executor's host
timeline (inputs built and copied, forward launched, sampling and token copy queued, waiting
for the tokens, result built) and, when GPU timing is on, the forward's device time from CUDA
events. ``summary()`` splits decode-only plans from the rest; host overhead of a step is its
wall time minus the forward's device time (with overlapped steps the wall time spans the next
plan's launch too).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from greenroom.bus.messages import Message
from greenroom.heap import gc_pauses


class EngineProfileQuery(Message):
    """Reply: the timings since the last query (``reset`` clears them); ``gpu_timing`` turns
    CUDA-event timing of each forward on or off from now on."""

    reset: bool = True
    gpu_timing: bool = False
    steps: bool = False  # include every step's row (``EngineProfile.steps``)


class EngineProfile(Message):
    """An engine's step timings (``StepProfile.summary``): decode-only plans and the rest.
    A message rather than a bare dict, so it crosses a process boundary too."""

    decode: dict[str, float | int | None] = msgspec.field(default_factory=dict)
    other: dict[str, float | int | None] = msgspec.field(default_factory=dict)
    # CUDA caching-allocator counters since the last reset (``allocator_counters``): device
    # mallocs, frees and out-of-memory retries synchronize the device, so any during serving
    # stall the overlapped steps
    allocator: dict[str, int] = msgspec.field(default_factory=dict)
    # the engine process's garbage collections since the last reset (``greenroom.heap``):
    # each pauses every thread of the process, the engine's host work included
    gc: dict[str, float] = msgspec.field(default_factory=dict)
    # one row per step when asked (``STEP_FIELDS``; gpu_ms -1 when not timed)
    steps: list[list[float]] = msgspec.field(default_factory=list)
    # steps launched behind the one in flight (the engine runs overlapped steps); 0 for an
    # engine on plain steps
    overlapped_steps: int = 0

    def to_dict(self) -> dict:
        return {
            "decode": dict(self.decode),
            "other": dict(self.other),
            "allocator": dict(self.allocator),
            "gc": dict(self.gc),
            "overlapped_steps": self.overlapped_steps,
        }


STEP_FIELDS = (
    "end_s", "wall_ms", "gap_ms", "gpu_ms", "rows", "tokens", "decode_only",
    "prepare_ms", "forward_launch_ms", "token_wait_ms",
)  # fmt: skip

ALLOCATOR_COUNTERS = (
    "num_alloc_retries",
    "num_device_alloc",
    "num_device_free",
    "num_sync_all_streams",
)
HOST_COUNTERS = ("num_host_alloc", "num_host_free")


def allocator_counters() -> dict[str, int]:
    """The process's CUDA allocator counters (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats()
    out = {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTERS}
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    if host_stats is not None:
        hs = host_stats()
        out.update({k: int(hs.get(k, 0)) for k in HOST_COUNTERS})
    return out


class StepRecord(NamedTuple):
    end_s: float
    wall_ms: float
    gap_ms: float
    gpu_ms: float | None
    rows: int
    tokens: int
    decode_only: bool
    phases: dict[str, float]

    def as_row(self) -> list[float]:
        """Its values in ``STEP_FIELDS`` order (gpu_ms -1 when not timed)."""
        ph = self.phases
        return [
            self.end_s, self.wall_ms, self.gap_ms, -1.0 if self.gpu_ms is None else self.gpu_ms,
            self.rows, self.tokens, float(self.decode_only), ph.get("prepare_ms", 0.0),
            ph.get("forward_launch_ms", 0.0), ph.get("token_wait_ms", 0.0),
        ]  # fmt: skip


@dataclass
class StepProfile:
    max_steps: int = 100_000
    steps: list[StepRecord] = field(default_factory=list)
    overlapped_steps: int = 0  # plans launched without waiting for the previous one's tokens
    _last_end: float | None = None
    _overlapped: bool = False
    _counters: dict[str, int] = field(default_factory=allocator_counters)
    _since: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        gc_pauses()  # collections are timed from the engine's start

    def begin(self) -> tuple[float, float]:
        """(start time, gap since the previous step's end in ms)."""
        now = time.perf_counter()
        gap = (now - self._last_end) * 1e3 if self._last_end is not None else 0.0
        return now, gap

    def end(
        self,
        start: float,
        gap_ms: float,
        decode_only: bool,
        batch: int,
        gpu_ms: float | None,
        phases: dict[str, float] | None = None,
        tokens: int = 0,
    ) -> None:
        now = time.perf_counter()
        if not self._overlapped:
            self._last_end = now
        if len(self.steps) < self.max_steps:
            self.steps.append(
                StepRecord(
                    now, (now - start) * 1e3, gap_ms, gpu_ms, batch, tokens, decode_only,
                    phases or {},
                )
            )  # fmt: skip

    def mark_idle(self) -> None:
        """Overlapped steps: the engine waits for a plan from now (a step's ``end`` comes
        later, once the next plan was launched behind it)."""
        self._overlapped = True
        self._last_end = time.perf_counter()

    def reset(self) -> None:
        self.steps.clear()
        self.overlapped_steps = 0
        self._last_end = None
        self._counters = allocator_counters()
        self._since = time.perf_counter()

    def summary(self) -> dict:
        now = allocator_counters()
        allocator = {k: v - self._counters.get(k, 0) for k, v in now.items()}
        intervals = step_intervals(self.steps)
        return {
            "decode": _summarize([r for r in self.steps if r.decode_only], intervals[True]),
            "other": _summarize([r for r in self.steps if not r.decode_only], intervals[False]),
            "allocator": allocator,
            "gc": gc_pauses().summary(self._since),
            "overlapped_steps": self.overlapped_steps,
        }


def step_intervals(steps: list[StepRecord]) -> dict[bool, list[float]]:
    """Time (ms) from each step's end to the next one's, keyed by the later step's
    ``decode_only``: how often an engine delivers tokens. With overlapped steps a step's wall
    time also spans the launch of the one behind it, so it overstates the step; the interval
    does not (its median skips the idle gaps between bursts of work)."""
    out: dict[bool, list[float]] = {True: [], False: []}
    for prev, cur in zip(steps, steps[1:], strict=False):
        out[cur.decode_only].append((cur.end_s - prev.end_s) * 1e3)
    return out


def _summarize(rows: list[StepRecord], intervals: list[float] | None = None) -> dict:
    if not rows:
        return {"steps": 0}
    walls = [r.wall_ms for r in rows]
    # the first step after a pause waits for work, not for the scheduler: only gaps < 50 ms
    gaps = [r.gap_ms for r in rows if r.gap_ms < 50.0]
    gpus = [r.gpu_ms for r in rows if r.gpu_ms is not None]
    out = {
        "steps": len(rows),
        "batch_mean": round(statistics.fmean(r.rows for r in rows), 1),
        "wall_ms_mean": round(statistics.fmean(walls), 3),
        "wall_ms_p50": round(statistics.median(walls), 3),
        "wall_s_total": round(sum(walls) / 1e3, 3),
        "gap_ms_mean": round(statistics.fmean(gaps), 3) if gaps else None,
        "gap_ms_p50": round(statistics.median(gaps), 3) if gaps else None,
    }
    if intervals:
        out["interval_ms_p50"] = round(statistics.median(intervals), 3)
    if gpus:
        out["forward_gpu_ms_mean"] = round(statistics.fmean(gpus), 3)
        out["forward_gpu_s_total"] = round(sum(gpus) / 1e3, 3)
        out["host_ms_mean"] = round(out["wall_ms_mean"] - out["forward_gpu_ms_mean"], 3)
    # the step's timeline on the host (PlanExecutor's StepTiming): mean ms per phase
    phases = [r.phases for r in rows if r.phases]
    for key in phases[0] if phases else ():
        out[f"{key.removesuffix('_ms')}_ms_mean"] = round(
            statistics.fmean(p[key] for p in phases), 3
        )
    return out


__all__ = [
    "EngineProfile",
    "EngineProfileQuery",
    "StepProfile",
    "StepRecord",
    "allocator_counters",
    "step_intervals",
]
