"""Replay plots keep failed requests and SLO targets in view with legends off the lines; the
progress bar's ETA follows the schedule."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from greenroom.replay.metrics import Slo, summarize
from greenroom.replay.plots import latency_figure, throughput_figure, write_plots
from greenroom.replay.progress import ReplayProgress
from greenroom.replay.report import RequestRecord


def records() -> list[RequestRecord]:
    out = []
    for i in range(8):
        sent = 0.1 * i
        out.append(
            RequestRecord(
                index=i,
                scheduled_s=sent,
                sent_s=sent,
                ttft_s=0.02 + 0.01 * i,
                e2e_s=0.2,
                output_tokens=4,
                max_tokens=4,
                itl_s=[0.05] * 3,
                token_times_s=[sent + 0.05 * k for k in range(1, 5)],
                token_counts=[1] * 4,
            )
        )
    for i in range(8, 12):  # failed: no token, counted as overloaded
        out.append(
            RequestRecord(index=i, scheduled_s=0.5, sent_s=0.5, e2e_s=0.01, error_kind="overloaded")
        )
    return out


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_latency_cdfs_show_failures_and_slo_lines() -> None:
    report = summarize(records(), 2.0, Slo(ttft_ms=50.0, tpot_ms=60.0))
    fig = latency_figure(report)
    ttft, tpot, _, e2e = fig.axes
    assert "SLO 50 ms" in _labels(ttft) and "SLO 60 ms" in _labels(tpot)
    assert "4 failed (33%)" in _labels(ttft) and "4 failed (33%)" in _labels(e2e)
    step = ttft.get_lines()[1]  # after the SLO line
    assert max(step.get_ydata()) == pytest.approx(8 / 12)  # levels off at the completed share
    assert "8 of 12 requests completed, 4 failed" in fig._suptitle.get_text()
    fig.canvas.draw()
    for ax in fig.axes:  # every legend to the right of its axes: over no line
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1
    plt.close(fig)


def test_throughput_plot_draws_failures_with_the_legend_outside() -> None:
    report = summarize(records(), 2.0)
    fig = throughput_figure(report)
    bottom = fig.axes[1]
    labels = _labels(bottom)
    assert "failed req/s" in labels and "in flight" in labels
    fig.canvas.draw()
    right_axis = fig.axes[2]
    assert bottom.get_legend().get_window_extent().x0 >= right_axis.get_window_extent().x1
    plt.close(fig)


def test_plots_are_written(tmp_path) -> None:
    paths = write_plots(summarize(records(), 2.0), tmp_path)
    assert [p.name for p in paths] == ["latency_cdf.png", "throughput.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_progress_eta_follows_the_schedule(monkeypatch) -> None:
    bar = ReplayProgress(total=4, last_send_s=40.0, enabled=False)
    now = [1.0]
    monkeypatch.setattr(bar, "elapsed", lambda: now[0])
    assert bar.eta_s() == pytest.approx(39.0)  # nothing finished: until the last send
    bar.on_sent()
    now[0] = 2.0
    bar.on_finished(True, 1.0)  # mean latency 1 s is added
    assert bar.eta_s() == pytest.approx(39.0)
    now[0] = 40.0  # all sent at 40 s
    for _ in range(3):
        bar.on_sent()
    assert bar.eta_s() == pytest.approx(1.0)  # no finish since: the mean latency
    now[0] = 42.0
    bar.on_finished(True, 1.0)  # one of the 3 left in 2 s: 2 left at 0.5/s
    assert bar.eta_s() == pytest.approx(4.0)
    bar.on_finished(False, None)
    bar.on_finished(True, 1.0)
    assert bar.eta_s() == 0.0 and bar.failed == 1
