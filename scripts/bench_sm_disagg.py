"""SM-level prefill/decode disaggregation (fixed and adaptive routing) against mixed chunked
prefill, through real nodes.

One model (GPU default: ``random:llama-3.1-8b``; ``random:llama-2-70b-half`` is the published
per-layer regime), several request mixes (OpenOrca trace lengths, and fixed-shape mixes:
prefill-heavy, decode-heavy, balanced, long_context = 10,000-token prompts with 600-token
outputs), each at several Poisson loads, served by mixed chunked prefill, SM disaggregation
with fixed routing (every prompt on the context engine) and with adaptive routing (short
prompts ride in the generation step), all in one run: each mode is a fresh node in this
process with the same KV pool (``kv.num_blocks``) and budgets. Per point: output tokens/s per
GPU, tokens/s per user (1000 / mean TPOT), TTFT p50/p99. Each SM point is read against the
mixed curve of its mix at equal tokens/s per GPU (interpolated; the same offered load where
it falls outside the curve), with the issue's targets for adaptive as pass/fail fields:
>= 0.97x per user at every load of OpenOrca and decode-heavy, >= 1.25x on long_context and
>= 1.2x on prefill-heavy and balanced, TTFT p99 <= 1.0x. The ceiling per mixed point is the
most per-user speed any SM mode could reach (mixed TPOT over its decode-only step).
``--quick``: the tiny model on CPU. Prints one JSON object as the last line.
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
    MODE_GRAMMAR,
    Mode,
    Point,
    adaptive_targets,
    context_ttft_floor,
    mode_comparisons,
    node_overrides,
    parse_modes,
    plot_pareto,
    plot_targets,
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
MIXES = ("openorca", "prefill_heavy", "decode_heavy", "balanced", "long_context")
# fixed-shape mixes: (input tokens, output tokens)
SHAPES = {
    "prefill_heavy": (2048, 16),
    "decode_heavy": (64, 512),
    "balanced": (2048, 256),
    "long_context": (10000, 600),
}
# Poisson loads (requests/s) per mix, for the 8B shape on one H200; --load MIX=R1,R2 overrides
DEFAULT_LOADS = {
    "openorca": "8,16,24,32",
    "prefill_heavy": "3,6,9",
    "decode_heavy": "4,8,12",
    "balanced": "3,6",
    "long_context": "0.5,1,1.5",
}
QUICK_SHAPES = {"prefill_heavy": (256, 4), "decode_heavy": (8, 48), "balanced": (128, 16),
                "long_context": (200, 24)}  # fmt: skip
QUICK_LOADS = {"openorca": "40,160", "prefill_heavy": "40", "decode_heavy": "40",
               "balanced": "40", "long_context": "10,40"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Split a long run by --mixes (and --load), one invocation each; every "
        "invocation runs all --modes so each comparison is made within one run.",
    )
    ap.add_argument("--trace", default=DEFAULT_TRACE, help="OpenOrca lengths CSV")
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--num-blocks", type=int, default=16384, help="KV pool blocks (16 tokens)")
    ap.add_argument(
        "--max-model-len", type=int, default=0, help="0: 4096, or what long_context needs"
    )
    ap.add_argument("--max-num-tokens", type=int, default=2048, help="mixed chunk budget")
    ap.add_argument("--context-max-num-tokens", type=int, default=4096)
    ap.add_argument("--max-batch-size", type=int, default=128)
    ap.add_argument(
        "--modes",
        default="mixed,fixed,adaptive",
        help=f"comma-separated modes, each {MODE_GRAMMAR}; adaptive:N routes at N tokens "
        "instead of --routing-threshold (several sweep the threshold)",
    )
    ap.add_argument(
        "--sm-percents",
        default="0.5",
        help="context SM shares of the SM modes (default: sm_disagg.context_sm_percent)",
    )
    ap.add_argument(
        "--routing-threshold",
        type=int,
        default=0,
        help="adaptive routing threshold (0: the node measures it at start)",
    )
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"of {', '.join(MIXES)}")
    ap.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="MIX=R1,R2",
        help="Poisson loads (requests/s) of one mix; repeat per mix (defaults: "
        + "; ".join(f"{m}={r}" for m, r in DEFAULT_LOADS.items())
        + ")",
    )
    ap.add_argument("--requests", type=int, default=240, help="requests per OpenOrca point")
    ap.add_argument("--heavy-requests", type=int, default=64, help="per point of a shape mix")
    ap.add_argument("--long-requests", type=int, default=24, help="per long_context point")
    ap.add_argument(
        "--gpu-timing",
        action="store_true",
        help="also time each forward with CUDA events (host time = wall - forward); timing "
        "events serialize the two SM engines' streams, so SM modes run slower with it",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=500.0,
        help="run time to plan for: each mode gets an equal share of what is left and skips "
        "load points whose arrivals would overrun it",
    )
    ap.add_argument(
        "--context-graphs",
        choices=("on", "off"),
        default="on",
        help="the context engine's prefill CUDA graphs (sm_disagg.context_cuda_graphs)",
    )
    ap.add_argument(
        "--ride-when-idle",
        choices=("on", "off"),
        default="on",
        help="adaptive: a prompt of any length rides while the generation flow carries nothing "
        "(sm_disagg.ride_when_generation_idle); a mode's +idle / +noidle overrides it",
    )
    ap.add_argument("--gil-switch-ms", type=float, default=0.0, help="0: Python's default")
    ap.add_argument("--out", default="sm_disagg_results.json")
    ap.add_argument("--plot", default="sm_disagg_pareto.png", help="'' for none")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU")
    args = ap.parse_args(argv)
    shapes, loads = dict(SHAPES), dict(DEFAULT_LOADS)
    if args.quick:
        args.model, args.num_blocks = None, 1024
        args.max_num_tokens, args.context_max_num_tokens, args.max_batch_size = 64, 64, 32
        args.requests, args.heavy_requests, args.long_requests = 12, 8, 6
        args.sm_percents = "0.5"
        shapes, loads = QUICK_SHAPES, dict(QUICK_LOADS)
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    bad = [m for m in mixes if m not in MIXES]
    if bad or not mixes:
        ap.error(f"--mixes {args.mixes!r} is invalid: choose from {', '.join(MIXES)}")
    for item in args.load:
        mix, _, rates = item.partition("=")
        if mix not in MIXES or not rates:
            ap.error(f"--load {item!r} is invalid: MIX=R1,R2 with MIX one of {', '.join(MIXES)}")
        loads[mix] = rates
    try:
        args.loads = {m: [float(r) for r in loads[m].split(",")] for m in mixes}
        args.mode_list = parse_modes(args.modes, args.sm_percents)
    except ValueError as exc:
        ap.error(str(exc))
    if any(r <= 0 for rates in args.loads.values() for r in rates):
        ap.error("every --load rate must be > 0")
    args.mix_list, args.shapes = mixes, shapes
    if not args.max_model_len:
        longest = max((sum(shapes[m]) for m in mixes if m in shapes), default=0)
        args.max_model_len = 0 if args.quick else max(4096, -(-(longest + 64) // 1024) * 1024)
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
        "sm_disagg.ride_when_generation_idle": args.ride_when_idle == "on",
        "sm_disagg.routing_threshold_tokens": args.routing_threshold,
    }


def request_sets(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> list[tuple]:
    """(mix, rate, requests) for every mix and load: the trace's lengths, or a fixed shape."""
    fit = {"vocab_size": vocab_size, "max_model_len": max_model_len, "seed": 0}
    if args.quick:
        fit.update(max_input_len=64, max_output_len=16)
    sets = []
    for mix in args.mix_list:
        if mix == "openorca":
            rows = read_rows(args.trace, "lengths", limit=args.requests)
            sets += [(mix, r, build_requests(rows, rate=r, **fit)) for r in args.loads[mix]]
            continue
        isl, osl = args.shapes[mix]
        count = args.long_requests if mix == "long_context" else args.heavy_requests
        rows = [TraceRow(None, isl, osl) for _ in range(count)]
        sets += [
            (mix, r, build_requests(rows, vocab_size=vocab_size, rate=r, seed=1))
            for r in args.loads[mix]
        ]
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
                if time.perf_counter() + reqs[-1].arrival_s > deadline:
                    # its arrivals alone would overrun this mode's share of --budget-s
                    log(f"{mode.name} {mix}@{rate}: skipped (budget)")
                    info.setdefault("skipped", []).append(f"{mix}@{rate:g}")
                    continue
                await _profile(engines, gpu_timing=args.gpu_timing)  # reset: this point only
                before = await node.scheduler_stats()
                report = await replay(reqs, client)
                p = point_from_report(mode.name, mix, rate, report)
                points.append(p)
                prof = await _profile(engines, gpu_timing=False)
                profiles[f"{mix}@{rate:g}"] = prof
                after = await node.scheduler_stats()
                info.setdefault("routed_per_point", {})[f"{mix}@{rate:g}"] = {
                    k: after.get(k, 0) - before.get(k, 0)
                    for k in ("handoffs", "prompts_in_generation")
                }
                log(f"{mode.name:6s} {mix:13s} rate {rate:5.1f} steps: {json.dumps(prof)}")
                log(
                    f"{mode.name:6s} {mix:13s} rate {rate:5.1f}: {p.output_tokens_per_s_per_gpu:7.0f} "
                    f"tok/s/gpu  {p.tokens_per_s_per_user or 0:6.1f} tok/s/user  TTFT p50 "
                    f"{p.ttft_p50_ms or 0:7.0f} p99 {p.ttft_p99_ms or 0:7.0f} ms  failed {p.num_failed}"
                )
        info["scheduler"] = await node.refs["scheduler"].ask(_stats_query(), timeout=10)
        if mode.sm_percent is not None:
            info["routing_threshold_tokens"] = node.cfg.sm_disagg.routing_threshold_tokens
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

    modes: list[Mode] = args.mode_list
    points: list[Point] = []
    modes_info = []
    result: dict = {}
    for i, mode in enumerate(modes):
        # each mode gets an equal share of what is left, so later modes still run their points
        share = (deadline - time.perf_counter()) / (len(modes) - i)
        pts, info = await run_mode(mode, args, time.perf_counter() + share, log)
        points += pts
        modes_info.append(info)
        log(f"{mode.name}: {info}")
        result = summarize(args, points, modes_info)
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive
    if args.plot and points:
        mix = "openorca" if any(p.mix == "openorca" for p in points) else points[0].mix
        title = f"{args.model or 'tiny'} on {device_info()['device']}: {mix}, Poisson loads"
        plot_pareto([p for p in points if p.mix == mix], args.plot, title)
        result["pareto_png"] = args.plot
        if result.get("comparisons"):
            targets_png = str(Path(args.plot).with_name(Path(args.plot).stem + "_targets.png"))
            plot_targets(
                result["comparisons"], targets_png, f"{args.model or 'tiny'}: adaptive vs mixed"
            )
            result["targets_png"] = targets_png
    result["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def summarize(args, points: list[Point], modes_info: list[dict]) -> dict:
    from greenroom.kernels.sm_partition import choose_sm_split

    dev = device_info()
    splits = {}
    if "sms" in dev:
        for m in args.mode_list:
            if m.sm_percent is not None:
                splits[m.name] = choose_sm_split(dev["sms"], m.sm_percent)
    sm_modes = [m.name for m in args.mode_list if m.sm_percent is not None]
    comparisons = {
        mix: {mode: mode_comparisons(points, mode, mix) for mode in sm_modes}
        for mix in args.mix_list
    }
    targets = adaptive_targets(points)
    verdicts = [t["pass"] for t in targets.values()]
    return {
        "benchmark": "sm_disagg",
        **dev,
        "model": args.model or "tiny-llama (embedded, CPU)",
        "mixes": {m: args.shapes.get(m, "trace") for m in args.mix_list},
        "loads": args.loads,
        "sm_splits": splits,
        "config": {k: v for k, v in base_overrides(args).items() if k not in ("port", "log_level")},
        "gil_switch_ms": args.gil_switch_ms or None,
        "modes": modes_info,
        "points": [p.to_dict() for p in points],
        "comparisons": comparisons,
        "targets": {k: {f: v for f, v in t.items() if f != "rows"} for k, t in targets.items()},
        # every adaptive target judged and met (None: nothing could be judged)
        "targets_met": all(verdicts) if verdicts and None not in verdicts else None,
        "user_speedup_ceilings": ceilings(points, modes_info),
        "context_ttft_floors": ttft_floors(points, modes_info),
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


def ttft_floors(points: list[Point], modes_info: list[dict]) -> list[dict]:
    """Per SM point whose context engine prefilled prompts: the TTFT its speed alone implies
    against mixed mode's TTFT p99 at the same mix and load (``context_ttft_floor``)."""
    mixed = {(p.mix, p.rate): p for p in points if p.mode == "mixed"}
    info = {m["mode"]: m for m in modes_info}
    out = []
    for p in points:
        m, key = info.get(p.mode, {}), f"{p.mix}@{p.rate:g}"
        prof = m.get("profiles", {}).get(key, {}).get("context")
        prompts = m.get("routed_per_point", {}).get(key, {}).get("handoffs", 0)
        base = mixed.get((p.mix, p.rate))
        row = context_ttft_floor(p, prof, prompts, base) if prof and base else None
        if row is not None:
            out.append(row)
    return out


def brief(result: dict) -> dict:
    """The last line: verdicts, ratios and the points, without per-step profiles."""
    out = {k: result[k] for k in ("benchmark", "device", "model", "targets_met", "targets")}
    out["routing_threshold_tokens"] = {
        m["mode"]: m["routing_threshold_tokens"]
        for m in result["modes"]
        if "routing_threshold_tokens" in m
    }
    out["routed"] = {
        m["mode"]: {
            k: m.get("scheduler", {}).get(k, 0) for k in ("handoffs", "prompts_in_generation")
        }
        for m in result["modes"]
        if m["mode"] != "mixed"
    }
    out["user_speedup_ceilings"] = {
        f"{c['mix']}@{c['rate']:g}": c["user_speedup_ceiling"]
        for c in result["user_speedup_ceilings"]
    }
    out["context_ttft_floors"] = {
        f"{c['mix']}@{c['rate']:g}/{c['mode']}": c["floor_over_mixed_p99"]
        for c in result["context_ttft_floors"]
    }
    out["comparisons"] = {
        f"{mix}/{mode}": [
            {
                k: r[k]
                for k in (
                    "rate",
                    "compared_at",
                    "user_speedup",
                    "ttft_p99_ratio",
                    "ttft_p99_ratio_interval90",
                )
            }
            for r in rows
        ]
        for mix, by_mode in result["comparisons"].items()
        for mode, rows in by_mode.items()
    }
    keys = ("mode", "mix", "rate", "output_tokens_per_s_per_gpu", "tokens_per_s_per_user",
            "ttft_p99_ms", "num_failed")  # fmt: skip
    out["points"] = [{k: p[k] for k in keys} for p in result["points"]]
    out["skipped"] = {m["mode"]: m["skipped"] for m in result["modes"] if m.get("skipped")}
    out["lost_requests"] = result["lost_requests"]
    out["total_s"] = result.get("total_s")
    return out


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    print(json.dumps(brief(result)))
    if result["lost_requests"]:
        print(f"bench_sm_disagg: {result['lost_requests']} requests failed", file=sys.stderr)
        sys.exit(1)
