"""SM-level prefill/decode disaggregation against mixed chunked prefill, through real nodes.

One model (GPU default: ``random:llama-3.1-8b``, bf16), one request set (lengths from the
OpenOrca trace, Poisson arrivals) at several loads, served by mixed chunked prefill and by SM
disaggregation at several ``context_sm_percent`` values, all in one run: each mode is a fresh
node in this process with the same KV pool (``kv.num_blocks``) and budgets. Per point: output
tokens/s per GPU, tokens/s per user (1000 / mean TPOT), TTFT p50/p99. The target is read at
equal tokens/s per GPU (the mixed curve interpolated at each SM point's throughput): >= 1.3x
tokens/s per user with TTFT p99 <= 1.5x. A prefill-heavy and a decode-heavy mix (one load each)
show the worst cases. Draws the Pareto curves (PNG). ``--quick``: the tiny model on CPU.
Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

from greenroom.bench.sm_disagg import (
    Mode,
    Point,
    best_comparison,
    compare_at_equal_throughput,
    node_overrides,
    plot_pareto,
    point_from_report,
    user_speed_ceiling,
)
from greenroom.client import AsyncClient
from greenroom.config import load_config
from greenroom.node import Node
from greenroom.replay import TraceRow, build_requests, read_rows, replay
from greenroom.replay.bundled import OPENORCA, bundled_trace

# the bundled slice (1,000 rows, greenroom/data/SOURCE.md); the full trace for real runs
DEFAULT_TRACE = bundled_trace(OPENORCA)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--num-blocks", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-tokens", type=int, default=2048, help="mixed chunk budget")
    ap.add_argument("--context-max-num-tokens", type=int, default=4096)
    ap.add_argument("--max-batch-size", type=int, default=128)
    ap.add_argument("--requests", type=int, default=240, help="requests per load point")
    ap.add_argument("--rates", default="8,16,24,32", help="Poisson loads, requests/s")
    ap.add_argument("--sm-percents", default="0.3,0.5")
    ap.add_argument("--heavy-requests", type=int, default=64)
    ap.add_argument("--prefill-heavy", default="2048,16,6", help="input,output,rate")
    ap.add_argument("--decode-heavy", default="64,512,8", help="input,output,rate")
    ap.add_argument("--balanced", default="2048,256,6", help="input,output,rate")
    ap.add_argument(
        "--mixes",
        default="openorca,prefill_heavy,decode_heavy",
        help="request sets to run, of openorca, prefill_heavy, decode_heavy, balanced",
    )
    ap.add_argument(
        "--gpu-timing",
        action="store_true",
        help="also time each forward with CUDA events (host time = wall - forward); timing "
        "events serialize the two SM engines' streams, so SM modes run slower with it",
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip points past this")
    ap.add_argument("--sm-only", action="store_true", help="skip the mixed baseline")
    ap.add_argument(
        "--context-graphs",
        choices=("on", "off"),
        default="on",
        help="the context engine's prefill CUDA graphs (sm_disagg.context_cuda_graphs)",
    )
    ap.add_argument("--gil-switch-ms", type=float, default=0.0, help="0: Python's default")
    ap.add_argument("--out", default="sm_disagg_results.json")
    ap.add_argument("--plot", default="sm_disagg_pareto.png")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.num_blocks, args.max_model_len = None, 1024, 0
        args.max_num_tokens, args.context_max_num_tokens, args.max_batch_size = 64, 64, 32
        args.requests, args.rates, args.sm_percents = 16, "40,160", "0.5"
        args.heavy_requests, args.prefill_heavy, args.decode_heavy = 8, "256,4,40", "8,48,40"
    return args


def base_overrides(args: argparse.Namespace) -> dict:
    return {
        "port": 0,
        "log_level": "info",  # startup lines: SM partitions, graphs, engines
        "model.path": args.model,
        "model.max_model_len": args.max_model_len,
        "model.cuda_graph_max_batch_size": args.max_batch_size,
        "kv.num_blocks": args.num_blocks,
        "kv.enable_prefix_reuse": False,  # load points replay the same prompts
        "scheduler.max_num_tokens": args.max_num_tokens,
        "scheduler.max_batch_size": args.max_batch_size,
        # no more admitted than can decode at once: queueing shows in TTFT in both modes
        # (with more, SM disaggregation parks prefilled requests waiting for a decode slot
        # and its queueing moves into TPOT)
        "scheduler.max_num_active_requests": args.max_batch_size,
        "sm_disagg.context_max_num_tokens": args.context_max_num_tokens,
        "sm_disagg.context_cuda_graphs": args.context_graphs == "on",
    }


def request_sets(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> list[tuple]:
    """(mix, rate, requests): the trace at every load, then the two heavy mixes."""
    fit = {"vocab_size": vocab_size, "max_model_len": max_model_len, "seed": 0}
    if args.quick:
        fit.update(max_input_len=64, max_output_len=16)
    mixes = args.mixes.split(",")
    sets = []
    if "openorca" in mixes:
        rows = read_rows(args.trace, "lengths", limit=args.requests)
        sets += [
            ("openorca", rate, build_requests(rows, rate=rate, **fit))
            for rate in (float(r) for r in args.rates.split(","))
        ]
    for mix, spec in (
        ("prefill_heavy", args.prefill_heavy),
        ("decode_heavy", args.decode_heavy),
        ("balanced", args.balanced),
    ):
        if mix not in mixes:
            continue
        isl, osl, rate = (float(x) for x in spec.split(","))
        heavy = [TraceRow(None, int(isl), int(osl)) for _ in range(args.heavy_requests)]
        sets.append((mix, rate, build_requests(heavy, vocab_size=vocab_size, rate=rate, seed=1)))
    return sets


def release_device() -> dict:
    gc.collect()
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"allocated_gib_after_stop": round(torch.cuda.memory_allocated() / 2**30, 3)}


async def run_mode(mode: Mode, args, deadline: float, log) -> tuple[list[Point], dict]:
    cfg = load_config(overrides=node_overrides(mode, base_overrides(args)))
    t0 = time.perf_counter()
    node = await Node.start(cfg)
    info = {"mode": mode.name, "start_s": round(time.perf_counter() - t0, 1)}
    points: list[Point] = []
    try:
        async with AsyncClient(node.address, timeout=600) as client:
            sets = request_sets(args, node.info.vocab_size, node.info.max_model_len)
            warm = [TraceRow(None, n, 8) for n in (1500, 300, 40, 700, 90, 5, 2000, 60)]
            t0 = time.perf_counter()
            await replay(build_requests(warm, vocab_size=node.info.vocab_size, seed=9), client)
            info["warmup_s"] = round(time.perf_counter() - t0, 1)
            engines = {
                k: node.refs[k] for k in ("mixed", "context", "generation") if k in node.refs
            }
            # every point's engine step timings (wall clock; the mixed ones give the ceiling)
            profiles = info.setdefault("profiles", {})
            for mix, rate, reqs in sets:
                if time.perf_counter() > deadline:
                    log(f"{mode.name} {mix}@{rate}: skipped (budget)")
                    continue
                await _profile(engines, gpu_timing=args.gpu_timing)  # reset: this point only
                report = await replay(reqs, client)
                p = point_from_report(mode.name, mix, rate, report)
                points.append(p)
                prof = await _profile(engines, gpu_timing=False)
                profiles[f"{mix}@{rate:g}"] = prof
                log(f"{mode.name:6s} {mix:13s} rate {rate:5.1f} steps: {json.dumps(prof)}")
                log(
                    f"{mode.name:6s} {mix:13s} rate {rate:5.1f}: {p.output_tokens_per_s_per_gpu:7.0f} "
                    f"tok/s/gpu  {p.tokens_per_s_per_user or 0:6.1f} tok/s/user  TTFT p50 "
                    f"{p.ttft_p50_ms or 0:7.0f} p99 {p.ttft_p99_ms or 0:7.0f} ms  failed {p.num_failed}"
                )
        info["scheduler"] = await node.refs["scheduler"].ask(_stats_query(), timeout=10)
    finally:
        await node.stop()
        del node
        info.update(release_device())
    return points, info


async def _profile(engines: dict, gpu_timing: bool) -> dict:
    from greenroom.actors.step_profile import EngineProfileQuery

    query = EngineProfileQuery(reset=True, gpu_timing=gpu_timing)
    return {name: (await ref.ask(query, timeout=10)).to_dict() for name, ref in engines.items()}


def _stats_query():
    from greenroom.actors.scheduler import SchedulerStatsQuery

    return SchedulerStatsQuery()


def heavy_summary(points: list[Point]) -> dict:
    """Per heavy mix: each SM mode against mixed at the same offered load."""
    out = {}
    for mix in ("prefill_heavy", "decode_heavy", "balanced"):
        base = next((p for p in points if p.mix == mix and p.mode == "mixed"), None)
        if base is None:
            continue
        rows = {"mixed": base.to_dict()}
        for p in points:
            if p.mix != mix or p.mode == "mixed":
                continue
            rows[p.mode] = {
                **p.to_dict(),
                "throughput_ratio": _ratio(
                    p.output_tokens_per_s_per_gpu, base.output_tokens_per_s_per_gpu
                ),
                "user_speed_ratio": _ratio(p.tokens_per_s_per_user, base.tokens_per_s_per_user),
                "ttft_p99_ratio": _ratio(p.ttft_p99_ms, base.ttft_p99_ms),
            }
        out[mix] = rows
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "sms": props.multi_processor_count}


async def main(args: argparse.Namespace) -> dict:
    if args.gil_switch_ms > 0:
        sys.setswitchinterval(args.gil_switch_ms / 1000)
    start = time.perf_counter()
    deadline = start + args.budget_s

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    modes = ([] if args.sm_only else [Mode.mixed()]) + [
        Mode.sm(float(p)) for p in args.sm_percents.split(",")
    ]
    points: list[Point] = []
    modes_info = []
    result: dict = {}
    for mode in modes:
        pts, info = await run_mode(mode, args, deadline, log)
        points += pts
        modes_info.append(info)
        log(f"{mode.name}: {info}")
        result = summarize(args, points, modes_info)
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive
    if args.plot:
        title = f"{args.model or 'tiny'} on {device_info()['device']}: OpenOrca, Poisson loads"
        plot_pareto([p for p in points if p.mix == "openorca"], args.plot, title)
        result["pareto_png"] = args.plot
    result["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def summarize(args, points: list[Point], modes_info: list[dict]) -> dict:
    from greenroom.kernels.sm_partition import choose_sm_split

    dev = device_info()
    trace = [p for p in points if p.mix == "openorca"]
    mixed = [p for p in trace if p.mode == "mixed"]
    comparisons = compare_at_equal_throughput(mixed, [p for p in trace if p.mode != "mixed"])
    best = best_comparison(comparisons)
    splits = {}
    if "sms" in dev:
        for p in args.sm_percents.split(","):
            splits[Mode.sm(float(p)).name] = choose_sm_split(dev["sms"], float(p))
    return {
        "benchmark": "sm_disagg",
        **dev,
        "model": args.model or "tiny-llama (embedded, CPU)",
        "sm_splits": splits,
        "config": {k: v for k, v in base_overrides(args).items() if k not in ("port", "log_level")},
        "gil_switch_ms": args.gil_switch_ms or None,
        "modes": modes_info,
        "points": [p.to_dict() for p in points],
        "comparisons": comparisons,
        "best": best,
        "target_met": bool(best and best["meets_target"]),
        "user_speedup_ceilings": ceilings(points, modes_info),
        "heavy_mixes": heavy_summary(points),
        # requests that failed at any point: the comparisons cover fewer than were sent
        "lost_requests": sum(p.num_failed for p in points),
    }


def ceilings(points: list[Point], modes_info: list[dict]) -> list[dict]:
    """Per mixed point (its engine step profile): the user-speed ratio SM
    disaggregation could reach at most at that load (``user_speed_ceiling``)."""
    profiles = next((m.get("profiles", {}) for m in modes_info if m["mode"] == "mixed"), {})
    out = []
    for p in points:
        prof = profiles.get(f"{p.mix}@{p.rate:g}", {}).get("mixed") if p.mode == "mixed" else None
        row = user_speed_ceiling(p, prof) if prof else None
        if row is not None:
            out.append(row)
    return out


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    brief = {k: result[k] for k in ("benchmark", "device", "model", "target_met", "best")}
    brief["user_speedup_ceilings"] = {
        f"{c['mix']}@{c['rate']:g}": c["user_speedup_ceiling"]
        for c in result["user_speedup_ceilings"]
    }
    brief["points"] = [
        {
            k: p[k]
            for k in (
                "mode",
                "mix",
                "rate",
                "output_tokens_per_s_per_gpu",
                "tokens_per_s_per_user",
                "ttft_p99_ms",
            )
        }
        for p in result["points"]
    ]
    brief["heavy_mixes"] = {
        mix: {
            m: {k: r.get(k) for k in ("user_speed_ratio", "ttft_p99_ratio", "throughput_ratio")}
            for m, r in rows.items()
            if m != "mixed"
        }
        for mix, rows in result["heavy_mixes"].items()
    }
    brief["lost_requests"] = result["lost_requests"]
    print(json.dumps(brief))
    if result["lost_requests"]:
        print(f"bench_sm_disagg: {result['lost_requests']} requests failed", file=sys.stderr)
        sys.exit(1)
