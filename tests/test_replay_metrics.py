"""Metrics: percentiles, TPOT and goodput per request, KV reuse sums, the timeline, and a
report that adds up (sent = completed + failed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from greenroom.bus.messages import RequestMetrics
from greenroom.replay.metrics import (
    Slo,
    latency_stats,
    meets_slo,
    parse_slo,
    summarize,
)
from greenroom.replay.report import RequestRecord, format_table


def done(index: int, sent: float, ttft: float, e2e: float, tokens: int, **kw) -> RequestRecord:
    """A completed request whose tokens arrived evenly after the first."""
    times = [sent + ttft]
    if tokens > 1:
        times += list(np.linspace(sent + ttft, sent + e2e, tokens)[1:])
    gaps = np.diff(times).tolist()
    return RequestRecord(
        index=index,
        scheduled_s=sent,
        sent_s=sent,
        prompt_tokens=kw.pop("prompt_tokens", 100),
        max_tokens=kw.pop("max_tokens", tokens),
        output_tokens=tokens,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=gaps,
        token_times_s=times,
        token_counts=[1] * tokens,
        finish_reason="length",
        **kw,
    )


def failed(index: int, sent: float, kind: str) -> RequestRecord:
    return RequestRecord(
        index=index, scheduled_s=sent, sent_s=sent, e2e_s=0.01, error_kind=kind, max_tokens=4
    )


def test_latency_stats_known_values() -> None:
    s = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s.count == 100
    assert s.mean == pytest.approx(50.5)
    assert s.p50 == pytest.approx(50.5)
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert s.max == pytest.approx(100.0)
    empty = latency_stats([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


def test_parse_slo() -> None:
    assert parse_slo("ttft=500,tpot=50") == Slo(500.0, 50.0)
    assert parse_slo(" TTFT = 200 ") == Slo(200.0, None)
    assert parse_slo("tpot=12.5") == Slo(None, 12.5)
    for bad in ("", "ttft", "e2e=5", "ttft=abc", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_tpot_and_slo_per_request() -> None:
    rec = done(0, 0.0, ttft=0.2, e2e=1.2, tokens=11)
    assert rec.tpot_s == pytest.approx(0.1)
    assert meets_slo(rec, Slo(ttft_ms=200.0, tpot_ms=100.0))
    assert not meets_slo(rec, Slo(ttft_ms=199.0))
    assert not meets_slo(rec, Slo(tpot_ms=99.0))
    one = done(1, 0.0, ttft=0.1, e2e=0.1, tokens=1)
    assert one.tpot_s is None and meets_slo(one, Slo(ttft_ms=150.0, tpot_ms=1.0))
    assert not meets_slo(failed(2, 0.0, "timeout"), Slo())


def test_summary_adds_up() -> None:
    m = RequestMetrics(
        num_prompt_tokens=100, num_cached_tokens=32, reused_blocks=2, new_blocks=5, missed_blocks=4
    )
    records = [
        done(0, 0.0, ttft=0.1, e2e=1.1, tokens=11, metrics=m),  # tpot 100 ms
        done(1, 0.5, ttft=0.3, e2e=0.8, tokens=6, metrics=m, clipped=True),  # tpot 100 ms
        done(2, 1.0, ttft=0.05, e2e=0.25, tokens=5, max_tokens=8),  # tpot 50 ms, short
        failed(3, 1.0, "overloaded"),
        failed(4, 1.2, "overloaded"),
        failed(5, 1.5, "timeout"),
    ]
    r = summarize(records, duration_s=2.0, slo=Slo(ttft_ms=200.0, tpot_ms=100.0))
    assert r.num_sent == 6 == r.num_completed + r.num_failed
    assert r.num_completed == 3
    assert r.failures == {"overloaded": 2, "timeout": 1}
    assert sum(r.failures.values()) == r.num_failed
    assert r.num_clipped == 1 and r.num_short_outputs == 1
    assert r.total_output_tokens == 22 and r.output_throughput == pytest.approx(11.0)
    assert r.total_input_tokens == 300 and r.request_throughput == pytest.approx(1.5)
    assert r.ttft_ms.count == 3 and r.ttft_ms.mean == pytest.approx(150.0)
    assert r.tpot_ms.p50 == pytest.approx(100.0)
    assert r.tokens_per_s_per_user.at_p50_tpot == pytest.approx(10.0)
    assert r.itl_ms.count == 10 + 5 + 4
    assert r.e2e_ms.max == pytest.approx(1100.0)
    assert r.goodput is not None
    assert r.goodput.num_good == 2  # request 1 misses TTFT, 3..5 failed
    assert r.goodput.requests_per_s == pytest.approx(1.0)
    assert r.goodput.fraction_of_sent == pytest.approx(2 / 6)
    assert r.prefix.reused_blocks == 4 and r.prefix.missed_blocks == 8
    assert r.prefix.hit_rate == pytest.approx(4 / 12)
    assert r.prefix.cached_token_fraction == pytest.approx(64 / 200)
    tl = r.timeline
    assert sum(tl.output_tokens_per_s) * tl.bucket_s == pytest.approx(22)
    assert sum(tl.completed_per_s) * tl.bucket_s == pytest.approx(3)
    assert sum(tl.sent_per_s) * tl.bucket_s == pytest.approx(6)
    assert tl.in_flight[-1] == 0 and max(tl.in_flight) >= 2

    data = json.loads(r.to_json())
    assert "records" not in data
    assert data["failures"] == {"overloaded": 2, "timeout": 1}
    assert data["num_sent"] == data["num_completed"] + data["num_failed"]
    assert len(r.records) == 6  # kept on the object for plots and requests.jsonl

    table = format_table(r)
    assert "overloaded=2, timeout=1" in table
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("latency (ms)"))
    latency_rows = lines[header : header + 6]
    assert len({len(line) for line in latency_rows}) == 1  # right-aligned columns
    assert latency_rows[1].split()[:2] == ["TTFT", "150.0"]


def test_empty_replay() -> None:
    r = summarize([], duration_s=0.0)
    assert r.num_sent == r.num_completed == r.num_failed == 0
    assert r.ttft_ms.mean is None and r.prefix.hit_rate is None and r.goodput is None
    assert json.loads(r.to_json())["num_sent"] == 0
    assert "TTFT" in format_table(r)
