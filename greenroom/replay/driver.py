"""The load driver: sends trace requests at their arrival times and records every token.

Each request runs as its own task; an error ends that request only and is counted by its
kind (`GreenroomError.kind`: invalid, overloaded, timeout, failed, aborted; the exception's
class name for anything else), so a replay always finishes with sent = completed + failed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from greenroom.bus.messages import SamplingParams, TokenDelta
from greenroom.replay.metrics import Slo, summarize
from greenroom.replay.progress import ReplayProgress
from greenroom.replay.report import ReplayReport, RequestRecord
from greenroom.replay.trace import TraceRequest


class StreamingClient(Protocol):
    def stream(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 35,
    ) -> AsyncIterator[TokenDelta]: ...


def scheduled_requests(
    requests: Sequence[TraceRequest], time_scale: float = 1.0, duration_s: float | None = None
) -> list[tuple[float, TraceRequest]]:
    """(send time, request) pairs: arrival times multiplied by `time_scale`, cut at
    `duration_s` (requests due at or after it are not sent)."""
    if time_scale < 0:
        raise ValueError(f"time_scale must not be negative, got {time_scale}")
    out = sorted(((r.arrival_s * time_scale, r) for r in requests), key=lambda p: p[0])
    if duration_s is not None:
        out = [p for p in out if p[0] < duration_s]
    return out


async def _run_one(
    client: StreamingClient,
    req: TraceRequest,
    rec: RequestRecord,
    start: float,
    request_id: str,
    priority: int,
) -> None:
    sampling = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
    prompt = req.prompt_token_ids
    ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    sent = time.perf_counter()
    rec.sent_s = sent - start
    last = sent
    finish: str | None = None
    try:
        async for delta in client.stream(
            prompt_token_ids=ids, sampling=sampling, request_id=request_id, priority=priority
        ):
            now = time.perf_counter()
            k = len(delta.token_ids)
            if k:
                if rec.ttft_s is None:
                    rec.ttft_s = now - sent
                else:
                    # a delta with k tokens spreads its gap over them (sum of ITLs = decode time)
                    rec.itl_s.extend([(now - last) / k] * k)
                last = now
                rec.output_tokens += k
                rec.token_times_s.append(now - start)
                rec.token_counts.append(k)
            if delta.metrics is not None:
                rec.metrics = delta.metrics
            if delta.finish_reason is not None:
                # no break: the stream ends by itself, and leaving early would abort it
                finish = delta.finish_reason
    except asyncio.CancelledError:
        rec.error_kind, rec.error_message = "cancelled", "replay cancelled"
        raise
    except Exception as e:  # every failure is counted, none ends the replay
        kind = getattr(e, "kind", None)
        rec.error_kind = kind if isinstance(kind, str) else type(e).__name__
        rec.error_message = str(e)
    finally:
        rec.e2e_s = time.perf_counter() - sent
    rec.finish_reason = finish
    if rec.error_kind is None:
        if finish is None:
            rec.error_kind, rec.error_message = "incomplete", "stream ended without finish_reason"
        elif finish == "abort":
            rec.error_kind, rec.error_message = "aborted", "server aborted the request"
        elif rec.ttft_s is None:
            rec.error_kind, rec.error_message = "empty", "finished without any token"


async def replay(
    requests: Sequence[TraceRequest],
    client: StreamingClient,
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    max_concurrency: int | None = None,
    slo: Slo | None = None,
    priority: int = 35,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
    report_on_cancel: bool = False,
) -> ReplayReport:
    """Replay `requests` against `client` and return the report.

    A request is sent at `arrival_s * time_scale` seconds after the start (or later, when
    `max_concurrency` requests are already in flight: it then waits in arrival order).
    With ``report_on_cancel``, a cancelled replay (Ctrl-C under ``asyncio.run``) returns the
    partial report instead of raising: requests in flight count as failed with kind
    "interrupted", those never sent as unsent.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    schedule = scheduled_requests(requests, time_scale, duration_s)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    run_id = uuid.uuid4().hex[:8]
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task] = set()
    bar = ReplayProgress(len(schedule), schedule[-1][0] if schedule else 0.0, progress)

    def finished(task: asyncio.Task, rec: RequestRecord) -> None:
        tasks.discard(task)
        if slots is not None:
            slots.release()
        bar.on_finished(rec.ok, rec.e2e_s)

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.5)
            bar.refresh()

    ticker = asyncio.create_task(tick()) if progress else None
    start = time.perf_counter()
    interrupted = False
    try:
        for send_at, req in schedule:
            delay = start + send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
            rec = RequestRecord(
                index=req.index,
                scheduled_s=send_at,
                prompt_tokens=req.prompt_length,
                max_tokens=req.max_tokens,
                clipped=req.clipped,
                capped=req.capped,
            )
            records.append(rec)
            rid = f"replay-{run_id}-{req.index}"
            task = asyncio.create_task(_run_one(client, req, rec, start, rid, priority))
            task.add_done_callback(lambda t, rec=rec: finished(t, rec))
            tasks.add(task)
            bar.on_sent()
        if tasks:
            await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        if not report_on_cancel:
            raise
        interrupted = True
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if ticker is not None:
            ticker.cancel()
        bar.close()
    for rec in records:
        if rec.error_kind == "cancelled":
            rec.error_kind, rec.error_message = "interrupted", "in flight when the replay stopped"
    report = summarize(records, time.perf_counter() - start, slo)
    report.num_unsent = len(schedule) - len(records)
    report.interrupted = interrupted
    if run_info:
        report.run = dict(run_info)
    return report
