"""Trace replay: trace readers, the load driver, metrics and reports.

requests = load_trace("trace.jsonl", vocab_size=info.vocab_size, max_model_len=info.max_model_len)
report = await replay(requests, client, time_scale=1.0, slo=parse_slo("ttft=500,tpot=50"))
"""

from greenroom.replay.driver import replay, scheduled_requests
from greenroom.replay.metrics import Slo, parse_slo, summarize
from greenroom.replay.readers import TraceFormatError, TraceRow, detect_format, read_rows
from greenroom.replay.report import LatencyStats, ReplayReport, RequestRecord, format_table
from greenroom.replay.trace import TraceRequest, build_requests, fit_lengths, load_trace

__all__ = [
    "LatencyStats",
    "ReplayReport",
    "RequestRecord",
    "Slo",
    "TraceFormatError",
    "TraceRequest",
    "TraceRow",
    "build_requests",
    "detect_format",
    "fit_lengths",
    "format_table",
    "load_trace",
    "parse_slo",
    "read_rows",
    "replay",
    "scheduled_requests",
    "summarize",
]
