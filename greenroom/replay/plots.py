"""PNG plots of a replay: latency CDFs and throughput over time (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from greenroom.replay.report import ReplayReport  # noqa: E402


def _cdf(ax, values_ms: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)
    if not values_ms:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.sort(np.asarray(values_ms))
    y = np.arange(1, len(x) + 1) / len(x)
    ax.step(x, y, where="post")
    for q, style in ((0.5, ":"), (0.9, "--"), (0.99, "-.")):
        ax.axvline(float(np.quantile(x, q)), color="gray", linestyle=style, linewidth=0.8)


def plot_latency_cdfs(report: ReplayReport, path: str | Path) -> Path:
    done = [r for r in report.records if r.ok]
    series = {
        "TTFT": [r.ttft_s * 1e3 for r in done if r.ttft_s is not None],
        "TPOT": [t * 1e3 for r in done if (t := r.tpot_s) is not None],
        "ITL": [x * 1e3 for r in done for x in r.itl_s],
        "E2E latency": [r.e2e_s * 1e3 for r in done if r.e2e_s is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values) in zip(axes.flat, series.items(), strict=True):
        _cdf(ax, values, title)
    fig.suptitle("latency CDFs (dotted p50, dashed p90, dash-dot p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_throughput(report: ReplayReport, path: str | Path) -> Path:
    tl = report.timeline
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(tl.start_s, tl.output_tokens_per_s, drawstyle="steps-post", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    top.grid(True, alpha=0.3)
    top.set_title(f"throughput over time ({tl.bucket_s:g} s buckets)")
    bottom.plot(tl.start_s, tl.sent_per_s, drawstyle="steps-post", label="sent req/s")
    bottom.plot(tl.start_s, tl.completed_per_s, drawstyle="steps-post", label="completed req/s")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("seconds since the replay started")
    bottom.grid(True, alpha=0.3)
    right = bottom.twinx()
    right.plot(
        tl.start_s, tl.in_flight, drawstyle="steps-post", color="gray", alpha=0.6, label="in flight"
    )
    right.set_ylabel("requests in flight")
    lines = bottom.get_lines() + right.get_lines()
    bottom.legend(lines, [ln.get_label() for ln in lines], loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_plots(report: ReplayReport, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(report, out / "latency_cdf.png"),
        plot_throughput(report, out / "throughput.png"),
    ]
