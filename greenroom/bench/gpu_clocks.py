"""The GPU's SM clock and power draw while a benchmark runs, sampled by ``nvidia-smi``.

A roofline's ceilings are measured in short bursts, at the highest clock the GPU reaches; a
serving run of a minute can hold the board at its power limit, where the driver lowers the SM
clock and compute-bound work slows with it. ``ClockSampler`` records what the clock and the
power were during the run so a report can tell a slower step from a slower GPU.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit")


@dataclass(frozen=True)
class ClockSummary:
    samples: int
    sm_clock_mhz_mean: float
    sm_clock_mhz_min: float
    sm_clock_mhz_max_rated: float
    power_w_mean: float
    power_limit_w: float
    # samples drawing at least 97% of the power limit: the driver caps the clock there
    at_power_limit_fraction: float

    @property
    def sm_clock_of_max(self) -> float:
        return self.sm_clock_mhz_mean / self.sm_clock_mhz_max_rated

    def to_dict(self) -> dict:
        return {**asdict(self), "sm_clock_of_max": self.sm_clock_of_max}


def parse_samples(text: str) -> ClockSummary | None:
    """Summary of ``nvidia-smi --query-gpu=<FIELDS> --format=csv,noheader,nounits`` lines
    (lines that do not parse, e.g. ``[N/A]`` fields, are skipped); None without any."""
    rows: list[tuple[float, ...]] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS):
            continue
        try:
            rows.append(tuple(float(p) for p in parts))
        except ValueError:
            continue
    if not rows:
        return None
    clocks, rated, power, limit = (list(col) for col in zip(*rows, strict=True))
    cap = statistics.fmean(limit)
    return ClockSummary(
        samples=len(rows),
        sm_clock_mhz_mean=statistics.fmean(clocks),
        sm_clock_mhz_min=min(clocks),
        sm_clock_mhz_max_rated=max(rated),
        power_w_mean=statistics.fmean(power),
        power_limit_w=cap,
        at_power_limit_fraction=sum(p >= 0.97 * cap for p in power) / len(rows),
    )


def smi_id(index: int = 0) -> str:
    """``nvidia-smi``'s name for CUDA device ``index``: its PCI address where torch knows it
    (CUDA_VISIBLE_DEVICES renumbers devices, nvidia-smi does not), else the index."""
    import torch

    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return str(index)
    domain, dev = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
    return f"{domain:08X}:{bus:02X}:{dev:02X}.0"


class ClockSampler:
    """Samples GPU ``gpu`` (an ``nvidia-smi --id``: index or PCI address) every
    ``interval_ms`` from ``start`` to ``stop`` (a background ``nvidia-smi`` process). Where
    there is no ``nvidia-smi`` it samples nothing and ``stop`` returns None. ``command``
    replaces the sampling command (tests)."""

    def __init__(
        self, gpu: str = "0", interval_ms: int = 500, command: Sequence[str] | None = None
    ) -> None:
        if command is None and shutil.which("nvidia-smi") is not None:
            command = [
                "nvidia-smi",
                f"--query-gpu={','.join(FIELDS)}",
                "--format=csv,noheader,nounits",
                f"--id={gpu}",
                f"-lms={interval_ms}",
            ]
        self.command = list(command) if command is not None else None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if self.command is None or self._proc is not None:
            return
        self._proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )

    def stop(self) -> ClockSummary | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return parse_samples(out)


__all__ = ["FIELDS", "ClockSampler", "ClockSummary", "parse_samples", "smi_id"]
