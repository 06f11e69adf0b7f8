"""The replay report: its schema, the JSON forms and the text table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from greenroom.bus.messages import RequestMetrics


class RequestRecord(msgspec.Struct, kw_only=True):
    """What happened to one replayed request; times in seconds from the replay start."""

    index: int
    scheduled_s: float
    sent_s: float | None = None
    prompt_tokens: int = 0
    max_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = []
    token_times_s: list[float] = []  # arrival of each delta that carried tokens
    token_counts: list[int] = []  # tokens in each of those deltas
    finish_reason: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    metrics: RequestMetrics | None = None
    clipped: bool = False
    capped: bool = False

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class LatencyStats(msgspec.Struct, frozen=True):
    """Milliseconds; None when there were no samples."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class UserSpeed(msgspec.Struct, frozen=True):
    """Tokens/s one user sees (1000 / TPOT ms) at the mean and at percentiles of TPOT; the p90
    value is the speed 90% of requests reached or beat."""

    at_mean_tpot: float | None = None
    at_p50_tpot: float | None = None
    at_p90_tpot: float | None = None
    at_p99_tpot: float | None = None


class Goodput(msgspec.Struct, frozen=True):
    """Requests that completed within both SLOs (a request of one token has no TPOT)."""

    ttft_ms: float | None
    tpot_ms: float | None
    num_good: int = 0
    requests_per_s: float = 0.0
    fraction_of_sent: float = 0.0


class PrefixStats(msgspec.Struct):
    """KV reuse summed over completed requests (blocks and tokens as the server counted)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    reused_blocks: int = 0
    onboarded_blocks: int = 0
    new_blocks: int = 0
    missed_blocks: int = 0
    preemptions: int = 0
    hit_rate: float | None = None  # (reused + onboarded) / (reused + onboarded + missed)
    cached_token_fraction: float | None = None


class Timeline(msgspec.Struct):
    """Per-bucket rates for the throughput plot; start_s is each bucket's start."""

    bucket_s: float = 1.0
    start_s: list[float] = []
    output_tokens_per_s: list[float] = []
    completed_per_s: list[float] = []
    sent_per_s: list[float] = []
    in_flight: list[int] = []  # requests sent and not finished at the bucket's end
    failed_per_s: list[float] = []


class ReplayReport(msgspec.Struct, kw_only=True):
    num_sent: int
    num_completed: int
    num_failed: int  # sent and failed (requests in flight at a Ctrl-C count as "interrupted")
    failures: dict[str, int] = {}
    num_unsent: int = 0  # scheduled, never sent: the replay was interrupted first
    interrupted: bool = False
    num_clipped: int = 0
    num_capped: int = 0
    num_short_outputs: int = 0  # completed with fewer tokens than max_tokens
    duration_s: float = 0.0
    request_throughput: float = 0.0
    input_throughput: float = 0.0
    output_throughput: float = 0.0
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    ttft_ms: LatencyStats = LatencyStats()
    tpot_ms: LatencyStats = LatencyStats()
    itl_ms: LatencyStats = LatencyStats()
    e2e_ms: LatencyStats = LatencyStats()
    send_lag_ms: LatencyStats = LatencyStats()  # actual send time minus scheduled time
    tokens_per_s_per_user: UserSpeed = UserSpeed()
    goodput: Goodput | None = None
    prefix: PrefixStats = msgspec.field(default_factory=PrefixStats)
    timeline: Timeline = msgspec.field(default_factory=Timeline)
    run: dict[str, Any] = {}  # what was replayed against what (trace, server, flags)
    records: list[RequestRecord] = []

    def summary(self) -> ReplayReport:
        """The report without per-request records."""
        return msgspec.structs.replace(self, records=[])

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-ready data (per-request records left out)."""
        data = msgspec.to_builtins(self.summary())
        del data["records"]
        return data

    def to_json(self, *, indent: int = 0) -> str:
        """The summary as JSON (one line unless indent > 0)."""
        text = msgspec.json.encode(self.to_dict()).decode()
        return msgspec.json.format(text, indent=indent) if indent else text


def write_report(report: ReplayReport, out_dir: str | Path) -> list[Path]:
    """Write report.json (summary) and requests.jsonl (one record per line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "report.json"
    summary.write_text(report.to_json(indent=2) + "\n")
    records = out / "requests.jsonl"
    enc = msgspec.json.Encoder()
    with open(records, "wb") as f:
        for rec in report.records:
            row = msgspec.to_builtins(rec)
            if rec.metrics is not None:  # an array on the wire; named fields in the file
                row["metrics"] = msgspec.structs.asdict(rec.metrics)
            f.write(enc.encode(row) + b"\n")
    return [summary, records]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(rows: list[list[str]], right_from: int = 1) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(report: ReplayReport) -> str:
    """A human-readable, aligned summary."""
    failures = ", ".join(f"{k}={v}" for k, v in sorted(report.failures.items())) or "none"
    overview = [
        ["requests sent", str(report.num_sent)],
        ["completed", str(report.num_completed)],
        ["failed", f"{report.num_failed} ({failures})"],
    ]
    if report.interrupted or report.num_unsent:
        overview.append(["not sent (interrupted)", str(report.num_unsent)])
    overview += [
        ["clipped to max_model_len", str(report.num_clipped)],
        ["capped by length limits", str(report.num_capped)],
        ["duration (s)", _fmt(report.duration_s, 2)],
        ["requests/s", _fmt(report.request_throughput, 3)],
        ["input tokens/s", _fmt(report.input_throughput)],
        ["output tokens/s", _fmt(report.output_throughput)],
        ["tokens/s per user (mean TPOT)", _fmt(report.tokens_per_s_per_user.at_mean_tpot)],
        ["tokens/s per user (p90 TPOT)", _fmt(report.tokens_per_s_per_user.at_p90_tpot)],
    ]
    if report.num_short_outputs:
        overview.append(["completed short of max_tokens", str(report.num_short_outputs)])
    if report.goodput is not None:
        g = report.goodput
        slo = f"ttft<={_fmt(g.ttft_ms, 0)} ms, tpot<={_fmt(g.tpot_ms, 0)} ms"
        overview.append([f"goodput ({slo})", f"{g.num_good} req, {g.requests_per_s:.3f} req/s"])
        overview.append(["goodput fraction of sent", f"{100 * g.fraction_of_sent:.1f}%"])
    p = report.prefix
    if p.hit_rate is not None:
        overview.append(["prefix block hit rate", f"{100 * p.hit_rate:.1f}%"])
    if p.cached_token_fraction is not None:
        overview.append(["cached prompt tokens", f"{100 * p.cached_token_fraction:.1f}%"])
    latency = [["latency (ms)", "mean", "p50", "p90", "p99", "max", "n"]]
    for name, s in (
        ("TTFT", report.ttft_ms),
        ("TPOT", report.tpot_ms),
        ("ITL", report.itl_ms),
        ("E2E", report.e2e_ms),
        ("send lag", report.send_lag_ms),
    ):
        latency.append(
            [name, _fmt(s.mean), _fmt(s.p50), _fmt(s.p90), _fmt(s.p99), _fmt(s.max), str(s.count)]
        )
    return "\n".join(_table(overview) + [""] + _table(latency))
