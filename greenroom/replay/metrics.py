"""Metrics over replayed requests: latency percentiles, throughput, goodput, KV reuse."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from greenroom.replay.report import (
    Goodput,
    LatencyStats,
    PrefixStats,
    ReplayReport,
    RequestRecord,
    Timeline,
    UserSpeed,
)


@dataclass(frozen=True, slots=True)
class Slo:
    """Latency targets in ms; a None target is always met."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


def parse_slo(text: str) -> Slo:
    """Parse `ttft=500,tpot=50` (milliseconds; either key may be left out)."""
    values: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot"):
            raise ValueError(f"bad SLO term {part!r}: expected ttft=MS and/or tpot=MS")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"bad SLO value in {part!r}: not a number") from None
        if values[key] <= 0:
            raise ValueError(f"SLO {key} must be positive, got {values[key]}")
    if not values:
        raise ValueError("empty SLO: expected ttft=MS and/or tpot=MS")
    return Slo(ttft_ms=values.get("ttft"), tpot_ms=values.get("tpot"))


def latency_stats(values_s: Sequence[float]) -> LatencyStats:
    """Mean and percentiles (linear interpolation) of seconds, reported in ms."""
    if len(values_s) == 0:
        return LatencyStats()
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(
        count=len(ms),
        mean=float(ms.mean()),
        p50=float(p50),
        p90=float(p90),
        p99=float(p99),
        max=float(ms.max()),
    )


def user_speed(tpot: LatencyStats) -> UserSpeed:
    def speed(ms: float | None) -> float | None:
        return None if ms is None or ms <= 0 else 1000.0 / ms

    return UserSpeed(speed(tpot.mean), speed(tpot.p50), speed(tpot.p90), speed(tpot.p99))


def meets_slo(rec: RequestRecord, slo: Slo) -> bool:
    if not rec.ok or rec.ttft_s is None:
        return False
    if slo.ttft_ms is not None and rec.ttft_s * 1000.0 > slo.ttft_ms:
        return False
    tpot = rec.tpot_s
    return slo.tpot_ms is None or tpot is None or tpot * 1000.0 <= slo.tpot_ms


def prefix_stats(records: Sequence[RequestRecord]) -> PrefixStats:
    s = PrefixStats()
    for rec in records:
        m = rec.metrics
        if not rec.ok or m is None:
            continue
        s.prompt_tokens += m.num_prompt_tokens
        s.cached_tokens += m.num_cached_tokens
        s.reused_blocks += m.reused_blocks
        s.onboarded_blocks += m.onboarded_blocks
        s.new_blocks += m.new_blocks
        s.missed_blocks += m.missed_blocks
        s.preemptions += m.preemptions
    hits = s.reused_blocks + s.onboarded_blocks
    if hits + s.missed_blocks:
        s.hit_rate = hits / (hits + s.missed_blocks)
    if s.prompt_tokens:
        s.cached_token_fraction = s.cached_tokens / s.prompt_tokens
    return s


def _bucket_size(duration_s: float, target_buckets: int = 120) -> float:
    """A round bucket width (1, 2 or 5 times a power of ten) giving about target buckets."""
    raw = max(duration_s / target_buckets, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def timeline(records: Sequence[RequestRecord], duration_s: float) -> Timeline:
    bucket = _bucket_size(duration_s)
    n = max(1, math.ceil(duration_s / bucket - 1e-9))
    tokens = np.zeros(n)
    completed = np.zeros(n)
    failed = np.zeros(n)
    sent = np.zeros(n)
    starts = np.zeros(n + 1)
    ends = np.zeros(n + 1)

    def slot(t: float) -> int:
        return min(n - 1, max(0, int(t / bucket)))

    for rec in records:
        for t, k in zip(rec.token_times_s, rec.token_counts, strict=True):
            tokens[slot(t)] += k
        if rec.sent_s is None:
            continue
        sent[slot(rec.sent_s)] += 1
        starts[slot(rec.sent_s) + 1] += 1
        if rec.e2e_s is not None:
            done = rec.sent_s + rec.e2e_s
            ends[slot(done) + 1] += 1
            if rec.ok:
                completed[slot(done)] += 1
            else:
                failed[slot(done)] += 1
    in_flight = (np.cumsum(starts) - np.cumsum(ends))[1:]
    return Timeline(
        bucket_s=bucket,
        start_s=[round(i * bucket, 6) for i in range(n)],
        output_tokens_per_s=[round(float(x), 3) for x in tokens / bucket],
        completed_per_s=[round(float(x), 3) for x in completed / bucket],
        sent_per_s=[round(float(x), 3) for x in sent / bucket],
        in_flight=[int(x) for x in in_flight],
        failed_per_s=[round(float(x), 3) for x in failed / bucket],
    )


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None
) -> ReplayReport:
    """Aggregate per-request records of a replay that took `duration_s` of wall time."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    tpot = latency_stats(tpots)
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    goodput = None
    if slo is not None:
        good = sum(meets_slo(r, slo) for r in done)
        goodput = Goodput(
            ttft_ms=slo.ttft_ms,
            tpot_ms=slo.tpot_ms,
            num_good=good,
            requests_per_s=good / duration,
            fraction_of_sent=good / len(records) if records else 0.0,
        )
    return ReplayReport(
        num_sent=len(records),
        num_completed=len(done),
        num_failed=len(failed),
        failures=dict(Counter(r.error_kind for r in failed if r.error_kind)),
        num_clipped=sum(r.clipped for r in records),
        num_capped=sum(r.capped for r in records),
        num_short_outputs=sum(r.output_tokens < r.max_tokens for r in done),
        duration_s=duration_s,
        request_throughput=len(done) / duration,
        input_throughput=input_tokens / duration,
        output_throughput=output_tokens / duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        ttft_ms=latency_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot_ms=tpot,
        itl_ms=latency_stats([x for r in done for x in r.itl_s]),
        e2e_ms=latency_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        send_lag_ms=latency_stats(
            [r.sent_s - r.scheduled_s for r in records if r.sent_s is not None]
        ),
        tokens_per_s_per_user=user_speed(tpot),
        goodput=goodput,
        prefix=prefix_stats(records),
        timeline=timeline(records, duration_s),
        records=list(records),
    )
