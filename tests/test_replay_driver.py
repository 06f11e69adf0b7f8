"""The load driver against fake clients with known timing: send times follow the trace,
TTFT/ITL/TPOT are measured from the stream, every failure is counted by kind, concurrency and
duration limits hold. Also the simulated server used by `--server sim://`."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from greenroom.bus.messages import RequestMetrics, SamplingParams, TokenDelta
from greenroom.client import Overloaded, RequestRejected
from greenroom.replay.driver import replay, scheduled_requests
from greenroom.replay.metrics import Slo
from greenroom.replay.readers import TraceRow
from greenroom.replay.simulated import SimulatedClient, SimulatedServerConfig
from greenroom.replay.trace import TraceRequest, build_requests


def request(index: int, arrival: float, max_tokens: int = 5, prompt_len: int = 8) -> TraceRequest:
    return TraceRequest(
        arrival_s=arrival,
        prompt_token_ids=np.arange(prompt_len, dtype=np.int32) + index,
        max_tokens=max_tokens,
        index=index,
    )


class FakeClient:
    """Streams `max_tokens` tokens: the first after `ttft`, then one every `itl` seconds (or
    `chunk` tokens per delta). `behaviour[index]` makes request `index` misbehave."""

    def __init__(self, ttft=0.03, itl=0.01, chunk=1, behaviour=None):
        self.ttft, self.itl, self.chunk = ttft, itl, chunk
        self.behaviour = behaviour or {}
        self.sent_at: dict[int, float] = {}
        self.calls: list[tuple[list[int], SamplingParams, str | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0

    async def stream(self, prompt_token_ids=None, sampling=None, *, request_id=None, priority=35):
        index = int(request_id.rsplit("-", 1)[1])
        self.sent_at[index] = time.perf_counter()
        self.calls.append((prompt_token_ids, sampling, request_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        mode = self.behaviour.get(index)
        try:
            if mode == "overloaded":
                raise Overloaded("queue full", request_id)
            if mode == "invalid":
                raise RequestRejected("too long", request_id)
            await asyncio.sleep(self.ttft)
            if mode == "crash":
                raise RuntimeError("socket gone")
            n = sampling.max_tokens
            sent = 0
            while sent < n:
                if sent:
                    await asyncio.sleep(self.itl * self.chunk)
                k = 1 if sent == 0 else min(self.chunk, n - sent)
                sent += k
                last = sent == n
                if last and mode == "no_finish":
                    return
                finish = ("abort" if mode == "abort" else "length") if last else None
                yield TokenDelta(
                    request_id=request_id,
                    token_ids=[7] * k,
                    finish_reason=finish,
                    metrics=RequestMetrics(num_prompt_tokens=len(prompt_token_ids))
                    if last
                    else None,
                )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


def test_schedule_scales_and_cuts() -> None:
    reqs = [request(i, t) for i, t in enumerate([0.0, 2.0, 1.0, 4.0])]
    sched = scheduled_requests(reqs, time_scale=0.5, duration_s=1.5)
    assert [(t, r.index) for t, r in sched] == [(0.0, 0), (0.5, 2), (1.0, 1)]
    assert [t for t, _ in scheduled_requests(reqs, time_scale=0.0)] == [0.0] * 4
    with pytest.raises(ValueError):
        scheduled_requests(reqs, time_scale=-1.0)


async def test_sends_on_schedule_and_measures_latency() -> None:
    client = FakeClient(ttft=0.04, itl=0.01)
    reqs = [request(i, 0.2 * i, max_tokens=6) for i in range(4)]
    t0 = time.perf_counter()
    report = await replay(reqs, client, time_scale=0.5, slo=Slo(ttft_ms=1000, tpot_ms=1000))
    offsets = [client.sent_at[i] - t0 for i in range(4)]
    for got, due in zip(offsets, [0.0, 0.1, 0.2, 0.3], strict=True):
        assert due - 0.005 <= got <= due + 0.08  # never early; late only by loop jitter
    assert report.num_sent == report.num_completed == 4 and report.num_failed == 0
    assert 40 <= report.ttft_ms.p50 < 100
    assert 10 <= report.tpot_ms.p50 < 30
    assert report.itl_ms.count == 4 * 5
    assert 90 <= report.e2e_ms.p50 < 200
    assert report.send_lag_ms.max < 80
    assert report.total_output_tokens == 24 and report.num_short_outputs == 0
    assert report.goodput is not None and report.goodput.num_good == 4
    assert 0.39 <= report.duration_s < 0.6
    for rec in report.records:
        assert rec.output_tokens == 6 and rec.finish_reason == "length"
        assert rec.ttft_s is not None and rec.e2e_s is not None and rec.ttft_s < rec.e2e_s
        assert rec.metrics is not None and rec.metrics.num_prompt_tokens == 8
    prompt, sampling, rid = client.calls[0]
    assert type(prompt) is list and all(type(t) is int for t in prompt)
    assert sampling.max_tokens == 6 and sampling.ignore_eos
    assert len({c[2] for c in client.calls}) == 4  # unique request ids


async def test_failures_are_counted_by_kind_and_never_stop_the_replay() -> None:
    behaviour = {1: "overloaded", 2: "invalid", 3: "crash", 4: "abort", 5: "no_finish"}
    client = FakeClient(ttft=0.005, itl=0.002, behaviour=behaviour)
    reqs = [request(i, 0.0) for i in range(8)]
    report = await replay(reqs, client, time_scale=1.0)
    assert report.num_sent == 8
    assert report.num_completed == 3 and report.num_failed == 5
    assert report.failures == {
        "overloaded": 1,
        "invalid": 1,
        "RuntimeError": 1,
        "aborted": 1,
        "incomplete": 1,
    }
    by_index = {r.index: r for r in report.records}
    assert by_index[1].error_message == "queue full"
    assert by_index[3].ttft_s is None and by_index[4].output_tokens == 5
    assert report.total_output_tokens == 15  # completed requests only


async def test_max_concurrency_holds_requests_in_arrival_order() -> None:
    client = FakeClient(ttft=0.02, itl=0.005)
    reqs = [request(i, 0.0, max_tokens=3) for i in range(6)]
    report = await replay(reqs, client, max_concurrency=2)
    assert client.max_in_flight == 2
    assert report.num_completed == 6
    order = sorted(client.sent_at, key=client.sent_at.get)
    assert order == list(range(6))
    lags = [r.sent_s - r.scheduled_s for r in sorted(report.records, key=lambda r: r.index)]
    assert lags[-1] > 0.05 > lags[0]
    assert report.send_lag_ms.max > 50


async def test_duration_stops_sending_but_finishes_in_flight() -> None:
    client = FakeClient(ttft=0.1, itl=0.01)
    reqs = [request(i, t) for i, t in enumerate([0.0, 0.05, 0.4, 1.0])]
    report = await replay(reqs, client, duration_s=0.2)
    assert sorted(client.sent_at) == [0, 1]
    assert report.num_sent == report.num_completed == 2  # in flight at 0.2 s, still completed


async def test_multi_token_deltas_spread_inter_token_latency() -> None:
    client = FakeClient(ttft=0.01, itl=0.01, chunk=4)
    report = await replay([request(0, 0.0, max_tokens=9)], client)
    rec = report.records[0]
    assert rec.output_tokens == 9 and rec.token_counts == [1, 4, 4]
    assert len(rec.itl_s) == 8
    assert rec.itl_s[:4] == [rec.itl_s[0]] * 4
    assert sum(rec.itl_s) == pytest.approx(rec.e2e_s - rec.ttft_s, abs=2e-3)
    assert rec.tpot_s == pytest.approx(0.01, abs=4e-3)


async def test_cancelling_a_replay_cancels_its_requests() -> None:
    client = FakeClient(ttft=5.0)
    task = asyncio.create_task(replay([request(i, 0.0) for i in range(3)], client))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert client.cancelled == 3 and client.in_flight == 0


async def test_simulated_server_shares_prefixes_and_refuses_like_a_server() -> None:
    rows = [TraceRow(0.01 * i, 1100, 4, [1, 2, 3]) for i in range(4)]
    rows += [TraceRow(0.05, 600, 4, [])]
    reqs = build_requests(rows, vocab_size=1000, max_model_len=4096)
    sim = SimulatedClient(SimulatedServerConfig(vocab_size=1000, decode_s=1e-3))
    report = await replay(reqs, sim)
    assert report.num_completed == 5
    # 68 full blocks of 16 in a 1100-token prompt; the first sender misses them all
    assert report.prefix.reused_blocks == 3 * 68
    assert report.prefix.missed_blocks == 68 + 37
    assert report.prefix.hit_rate == pytest.approx(204 / (204 + 105))

    busy = SimulatedClient(SimulatedServerConfig(max_in_flight=1, max_model_len=64))
    too_long = request(0, 0.0, max_tokens=60, prompt_len=8)
    report = await replay([too_long] + [request(i, 0.0) for i in range(1, 4)], busy)
    assert report.failures == {"invalid": 1, "overloaded": 2}
    assert report.num_completed == 1
    info = await busy.server_info()
    assert info.max_model_len == 64 and info.vocab_size == 32000
