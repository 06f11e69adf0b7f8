"""`greenroom replay` / scripts/replay_trace.py: replay a trace against a running server.

Prints an aligned metrics table and the paths of the files it wrote (report.json,
requests.jsonl, PNG plots in --out); with --quiet only the JSON report, on one stdout line.
Exit status: 0 when at most --max-failures requests failed, 1 when more failed (or none
completed), 2 for a bad trace, bad flags or an unreachable server, 130 when interrupted (the
partial report is still written).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from typing import Any

import greenroom
from greenroom.heap import freeze_startup_heap, thaw_heap
from greenroom.replay.driver import replay
from greenroom.replay.metrics import parse_slo
from greenroom.replay.readers import FORMATS, TraceFormatError, detect_format
from greenroom.replay.report import ReplayReport, format_table, write_report
from greenroom.replay.trace import load_trace

SIM_SCHEME = "sim://"


def _number(text: str, typ: type = float):
    try:
        return typ(text)
    except ValueError:
        word = "an integer" if typ is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _max_failures(text: str) -> tuple[float, bool]:
    """``"10"`` -> (10, False): at most 10 requests; ``"5%"`` -> (5, True): 5% of those sent."""
    percent = text.strip().endswith("%")
    value = _number(text.strip().rstrip("%"))
    if not value >= 0 or math.isinf(value) or (percent and value > 100):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a percentage, got {text!r}")
    return value, percent


def failures_allowed(limit: tuple[float, bool], num_sent: int) -> float:
    value, percent = limit
    return value * num_sent / 100 if percent else value


def _slo(text: str):
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the replay flags to `parser` (a top-level parser or a `replay` subparser)."""
    parser.add_argument(
        "trace",
        help="trace file: Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids), "
        "Azure CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or length-only CSV "
        "(input_length,output_length)",
    )
    parser.add_argument(
        "--server",
        default="tcp://127.0.0.1:7700",
        help="frontend address of a running greenroom server (default: %(default)s); "
        "'sim://' replays against an in-process simulated server with no model; an http:// "
        "URL replays against an OpenAI-compatible server (see --api)",
    )
    parser.add_argument(
        "--api",
        choices=("auto", "greenroom", "openai"),
        default="auto",
        help="greenroom: the native client; openai: streaming POST /v1/completions of any "
        "OpenAI-compatible server (greenroom's HTTP API, vLLM, SGLang, ...); auto: openai for "
        "http(s):// servers (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="with --api openai: the model to request (default: the first of /v1/models)",
    )
    parser.add_argument(
        "--format",
        choices=("auto", *FORMATS),
        default="auto",
        help="trace format; auto tells them apart by the first line (default: %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=_non_negative_float,
        default=1.0,
        metavar="X",
        help="multiply recorded arrival times by X: 0.5 replays twice as fast, 2 half as fast, "
        "0 sends everything at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-requests",
        type=_positive_int,
        metavar="N",
        help="replay only the first N requests of the trace",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="S",
        help="send only requests due within the first S seconds of the (scaled) replay; "
        "requests already sent run to completion",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        metavar="R",
        help="Poisson arrivals at R requests/s (seeded by --seed). Length-only traces have no "
        "times: without --rate all their requests arrive at once. For timed traces --rate "
        "replaces the recorded arrival times",
    )
    parser.add_argument(
        "--slo",
        type=_slo,
        metavar="ttft=MS,tpot=MS",
        help="latency targets for goodput: requests that completed with TTFT <= ttft and "
        "TPOT <= tpot (milliseconds; either may be left out)",
    )
    parser.add_argument(
        "--out",
        default="replay-out",
        metavar="DIR",
        help="folder for report.json, requests.jsonl, latency_cdf.png and throughput.png "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=lambda text: _number(text, int),
        default=0,
        help="seed of the synthetic prompt tokens and of --rate arrivals (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_positive_int,
        metavar="N",
        help="at most N requests in flight; later arrivals wait, in order (the wait shows as "
        "send lag in the report)",
    )
    parser.add_argument(
        "--max-input-len",
        type=_positive_int,
        metavar="N",
        help="cap every prompt at N tokens (applied before clipping to max_model_len; counted "
        "as capped, not clipped). Useful for small CPU runs",
    )
    parser.add_argument(
        "--max-output-len",
        type=_positive_int,
        metavar="N",
        help="cap every output at N tokens (max_tokens; applied before clipping)",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        metavar="N",
        help="clip requests to N tokens (prompt + output) instead of the server's max_model_len",
    )
    parser.add_argument(
        "--vocab-size",
        type=_positive_int,
        metavar="N",
        help="draw prompt token ids below N instead of the server's vocab_size",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="fail a request that receives nothing for S seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--max-failures",
        type=_max_failures,
        default=(0.0, False),
        metavar="N|P%",
        help="exit with status 1 when more than N requests (or P%% of those sent) failed "
        "(default: 0)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no table: only the JSON report, on one stdout line",
    )


DESCRIPTION = (
    "Replay an LLM request trace against a running greenroom server at its recorded arrival "
    "times; report TTFT, TPOT, ITL, end-to-end latency, throughput and goodput; write a JSON "
    "report and PNG plots. Prompts are synthetic token ids: Mooncake hash ids become shared "
    "512-token blocks, CSV requests get private random prompts. Outputs run to exactly "
    "max_tokens (ignore_eos)."
)


def build_parser() -> argparse.ArgumentParser:
    from greenroom.cli import OneLineParser

    parser = OneLineParser(prog="greenroom replay", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def api_of(address: str, api: str = "auto") -> str:
    if api != "auto":
        return api
    return "openai" if address.startswith(("http://", "https://")) else "greenroom"


def connect(address: str, timeout: float, api: str = "auto", model: str | None = None) -> Any:
    """A client for `address`, used as an async context manager."""
    if api_of(address, api) == "openai":
        from greenroom.replay.openai_client import OpenAIClient

        return OpenAIClient(address, model=model, timeout=timeout)
    if address.startswith(SIM_SCHEME):
        from greenroom.replay.simulated import SimulatedClient

        return SimulatedClient()
    from greenroom.client import AsyncClient

    # a server started just before the replay may still be loading: wait for it a while
    return AsyncClient(address, timeout=timeout, connect_timeout=60.0)


async def replay_with(client: Any, args: argparse.Namespace) -> int:
    fmt = detect_format(args.trace) if args.format == "auto" else args.format
    max_model_len, vocab_size, model = args.max_model_len, args.vocab_size, None
    if max_model_len is None or vocab_size is None:
        try:
            info = await client.server_info()
        except Exception as e:
            print(f"greenroom: error: no server info from {args.server}: {e}", file=sys.stderr)
            return 2
        max_model_len = max_model_len or info.max_model_len
        vocab_size = vocab_size or info.vocab_size
        model = info.model_name
        missing = [
            f
            for f, v in (("--max-model-len", max_model_len), ("--vocab-size", vocab_size))
            if not v
        ]
        if missing:
            print(
                f"error: {args.server} does not report {' and '.join(f[2:] for f in missing)}: "
                f"pass {' and '.join(missing)}",
                file=sys.stderr,
            )
            return 2
    requests = load_trace(
        args.trace,
        fmt,
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        seed=args.seed,
        max_requests=args.max_requests,
        rate=args.rate,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
    )
    slo = args.slo
    run_info = {
        "trace": str(args.trace),
        "format": fmt,
        "server": args.server,
        "api": api_of(args.server, getattr(args, "api", "auto")),
        "model": model,
        "max_model_len": max_model_len,
        "vocab_size": vocab_size,
        "time_scale": args.time_scale,
        "duration": args.duration,
        "max_requests": args.max_requests,
        "rate": args.rate,
        "seed": args.seed,
        "max_concurrency": args.max_concurrency,
        "max_input_len": args.max_input_len,
        "max_output_len": args.max_output_len,
        "slo": None if slo is None else {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "greenroom_version": greenroom.__version__,
    }
    # the trace's requests and everything loaded so far are never walked by a collection:
    # a full collection's pause would show up in the latencies this process measures
    freeze_startup_heap()
    try:
        report = await replay(
            requests,
            client,
            time_scale=args.time_scale,
            duration_s=args.duration,
            max_concurrency=args.max_concurrency,
            slo=slo,
            progress=not args.quiet,
            run_info=run_info,
            report_on_cancel=True,
        )
    finally:
        thaw_heap()
    written = write_report(report, args.out)
    if not args.no_plots:
        from greenroom.replay.plots import write_plots

        written += write_plots(report, args.out)
    if args.quiet:
        print(report.to_json())
    else:
        print(format_table(report))
        print("wrote " + ", ".join(str(p) for p in written))
    return exit_status(report, args.max_failures)


def exit_status(report: ReplayReport, max_failures: tuple[float, bool] = (0.0, False)) -> int:
    """0, or 1 past the failure limit (or nothing completed), or 130 when interrupted."""
    if report.interrupted:
        print(
            f"greenroom replay: interrupted: {report.num_sent} sent, {report.num_completed} "
            f"completed, {report.num_failed} failed, {report.num_unsent} not sent",
            file=sys.stderr,
        )
        return 130
    allowed = failures_allowed(max_failures, report.num_sent)
    if report.num_failed > allowed or (report.num_sent and not report.num_completed):
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(report.failures.items()))
        print(
            f"greenroom replay: {report.num_failed} of {report.num_sent} requests failed "
            f"({kinds}); more than --max-failures allows ({allowed:g})",
            file=sys.stderr,
        )
        return 1
    return 0


async def _run_async(args: argparse.Namespace) -> int:
    client = connect(
        args.server, args.timeout, getattr(args, "api", "auto"), getattr(args, "model", None)
    )
    async with client:
        return await replay_with(client, args)


def run(args: argparse.Namespace) -> int:
    """Run a replay from parsed arguments; returns the exit status."""
    try:
        return asyncio.run(_run_async(args))
    except (OSError, TraceFormatError, ValueError) as e:
        print(f"greenroom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
