"""PNG plots of a replay: latency CDFs and throughput over time (matplotlib, Agg backend).

Failed requests stay in the picture: each CDF is over every request sent, so it levels off at
the completed fraction with the failed share marked, and the throughput plot draws failures
per second. ``--slo`` targets are drawn on the TTFT and TPOT panels. Legends sit outside the
axes, so none covers a line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from greenroom.replay.report import ReplayReport  # noqa: E402

QUANTILES = ((0.5, ":", "p50"), (0.9, "--", "p90"), (0.99, "-.", "p99"))


def _cdf(
    ax,
    values_ms: list[float],
    title: str,
    num_failed: int = 0,
    slo_ms: float | None = None,
) -> None:
    """CDF of ``values_ms`` with ``num_failed`` more samples that never arrived (per request
    panels), so the curve ends at the completed share."""
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if title != "ITL" else "fraction of samples")
    ax.grid(True, alpha=0.3)
    if slo_ms is not None:
        ax.axvline(slo_ms, color="tab:red", linewidth=1.2, label=f"SLO {slo_ms:g} ms")
    if not values_ms:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    else:
        x = np.sort(np.asarray(values_ms))
        total = len(x) + num_failed
        y = np.arange(1, len(x) + 1) / total
        ax.step(x, y, where="post", color="tab:blue", label="completed")
        for q, style, name in QUANTILES:
            ax.axvline(
                float(np.quantile(x, q)), color="gray", linestyle=style, linewidth=0.8, label=name
            )
        if num_failed:
            ax.axhline(
                len(x) / total,
                color="tab:red",
                linestyle="--",
                linewidth=0.8,
                label=f"{num_failed} failed ({100 * num_failed / total:.0f}%)",
            )
        ax.set_ylim(0, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def latency_figure(report: ReplayReport):
    done = [r for r in report.records if r.ok]
    failed = sum(1 for r in report.records if not r.ok)
    g = report.goodput
    panels = [
        ("TTFT", [r.ttft_s * 1e3 for r in done if r.ttft_s is not None], failed, g and g.ttft_ms),
        ("TPOT", [t * 1e3 for r in done if (t := r.tpot_s) is not None], 0, g and g.tpot_ms),
        ("ITL", [x * 1e3 for r in done for x in r.itl_s], 0, None),
        ("E2E latency", [r.e2e_s * 1e3 for r in done if r.e2e_s is not None], failed, None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (title, values, num_failed, slo) in zip(axes.flat, panels, strict=True):
        _cdf(ax, values, title, num_failed, slo)
    sent = len(report.records)
    fig.suptitle(
        f"latency CDFs: {len(done)} of {sent} requests completed"
        + (f", {failed} failed" if failed else "")
    )
    fig.tight_layout()
    return fig


def throughput_figure(report: ReplayReport):
    tl = report.timeline
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    top.plot(tl.start_s, tl.output_tokens_per_s, drawstyle="steps-post", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    top.grid(True, alpha=0.3)
    top.set_title(f"throughput over time ({tl.bucket_s:g} s buckets)")
    bottom.plot(tl.start_s, tl.sent_per_s, drawstyle="steps-post", label="sent req/s")
    bottom.plot(tl.start_s, tl.completed_per_s, drawstyle="steps-post", label="completed req/s")
    if tl.failed_per_s and any(tl.failed_per_s):
        bottom.plot(
            tl.start_s,
            tl.failed_per_s,
            drawstyle="steps-post",
            color="tab:red",
            label="failed req/s",
        )
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("seconds since the replay started")
    bottom.grid(True, alpha=0.3)
    right = bottom.twinx()
    right.plot(
        tl.start_s, tl.in_flight, drawstyle="steps-post", color="gray", alpha=0.6, label="in flight"
    )
    right.set_ylabel("requests in flight")
    lines = bottom.get_lines() + right.get_lines()
    # outside the axes, to the right of the in-flight axis: over no line
    bottom.legend(
        lines,
        [ln.get_label() for ln in lines],
        loc="upper left",
        bbox_to_anchor=(1.08, 1.0),
        fontsize="small",
        frameon=False,
    )
    fig.tight_layout()
    return fig


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_latency_cdfs(report: ReplayReport, path: str | Path) -> Path:
    return _save(latency_figure(report), path)


def plot_throughput(report: ReplayReport, path: str | Path) -> Path:
    return _save(throughput_figure(report), path)


def write_plots(report: ReplayReport, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(report, out / "latency_cdf.png"),
        plot_throughput(report, out / "throughput.png"),
    ]
