"""The clock sampler's parsing and its background process (a stand-in command on CPU)."""

from __future__ import annotations

import sys
import time

import pytest

from greenroom.bench.gpu_clocks import ClockSampler, parse_samples

LINES = """1980, 1980, 120.5, 700.00
1530, 1980, 695.2, 700.00
[N/A], 1980, 690.0, 700.00
1440, 1980, 699.9, 700.00
garbage
"""


def test_parse_samples_summarizes_clock_and_power():
    s = parse_samples(LINES)
    assert s is not None and s.samples == 3  # the N/A and garbage lines are skipped
    assert s.sm_clock_mhz_mean == pytest.approx((1980 + 1530 + 1440) / 3)
    assert s.sm_clock_mhz_min == 1440 and s.sm_clock_mhz_max_rated == 1980
    assert s.power_limit_w == 700 and s.at_power_limit_fraction == pytest.approx(2 / 3)
    assert s.to_dict()["sm_clock_of_max"] == pytest.approx(s.sm_clock_mhz_mean / 1980)


def test_parse_samples_without_samples_is_none():
    assert parse_samples("") is None
    assert parse_samples("[N/A], [N/A], [N/A], [N/A]\n") is None


def test_sampler_reads_what_its_process_printed_until_stopped(tmp_path):
    printed = tmp_path / "printed"
    script = (
        "import pathlib, sys, time\n"
        "print('1500, 1980, 600.0, 700.0', flush=True)\n"
        "print('1700, 1980, 500.0, 700.0', flush=True)\n"
        f"pathlib.Path({str(printed)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    sampler = ClockSampler(command=[sys.executable, "-c", script])
    sampler.start()
    deadline = time.monotonic() + 30
    while not printed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert printed.exists()
    summary = sampler.stop()  # terminates the still-running sampler process
    assert summary is not None and summary.samples == 2
    assert summary.sm_clock_mhz_mean == 1600 and summary.at_power_limit_fraction == 0
    assert sampler.stop() is None  # stopped: nothing more to read


def test_sampler_without_a_command_samples_nothing(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    sampler = ClockSampler()
    sampler.start()
    assert sampler.stop() is None
