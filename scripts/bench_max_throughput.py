"""Max-throughput benchmark: as many concurrent requests as the node's KV pool holds, sent at
once, output tokens/s against the roofline of the same run.

Two request sets, in the form engines are compared by:
  fixed     --prompt-len prompts with --output-len outputs (1000 / 1000), as many requests as
            the pool holds at full length (capped at the decode batch, --max-batch-size);
  openorca  the first rows of the OpenOrca length set packaged with greenroom (MLPerf's
            llama2-70b sample), as many as the pool holds.
Every output runs to its length (EOS ignored), greedy. The roofline (greenroom.bench.roofline)
is prefill FLOPs at the matmul rate plus every decode step's weight read and every token's KV
read at the copy bandwidth, both ceilings measured in this run on this device. The node's
engine step timeline (greenroom.actors.step_profile) is reported per set, and on a GPU the SM
clock and power draw during it (``gpu_clocks``, greenroom.bench.gpu_clocks): the ceilings are
measured in bursts, at a clock a long run at the board's power limit may not hold.

GPU (default when CUDA is present): random bf16 weights of --model (Llama-3.1-8B shape) made
on the device. --quick: the small preset on CPU with a small pool and short requests (< 60 s).
Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from greenroom.bench.gpu_clocks import ClockSampler, smi_id
from greenroom.bench.roofline import measure_ceilings, serving_roofline
from greenroom.bench.serve import offline_throughput
from greenroom.config import load_config
from greenroom.models.arch import ArchConfig
from greenroom.models.presets import preset_config
from greenroom.models.runner import resolve_dtype
from greenroom.replay import TraceRequest
from greenroom.replay.readers import TraceRow
from greenroom.replay.trace import build_requests, load_trace

OPENORCA_SLICE = "data/openorca_slice.csv"
TARGET_FIXED = 0.75


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small preset on CPU (< 60 s)")
    p.add_argument("--model", default=None, help="random-weight preset (GPU: random:llama-3.1-8b)")
    p.add_argument("--prompt-len", type=int, default=None, help="fixed set: prompt tokens (1000)")
    p.add_argument("--output-len", type=int, default=None, help="fixed set: output tokens (1000)")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="decode batch and graph limit (GPU 512)"
    )
    p.add_argument(
        "--openorca-requests",
        type=int,
        default=None,
        help="openorca set: rows of the packaged slice (at most 1000; 0 skips the set)",
    )
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-length set")
    p.add_argument(
        "--client",
        choices=("process", "inline"),
        default="process",
        help="where the load generator runs: its own process (`greenroom replay`, as an "
        "external client would; default) or on the node's event loop in this process",
    )
    p.add_argument(
        "--gpu-timing",
        action="store_true",
        help="time every forward with CUDA events and report the share of the run the GPU "
        "spent in forwards (costs a little host time per step)",
    )
    p.add_argument(
        "--step-trace",
        type=Path,
        default=None,
        metavar="PATH",
        help="write every engine step of each set (actors.step_profile.STEP_FIELDS) to PATH as JSON",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node config override, e.g. --set engine_host=thread (repeatable)",
    )
    return p.parse_args()


def settings(args: argparse.Namespace) -> dict:
    quick = args.quick or not torch.cuda.is_available()
    gpu = {
        "model": "random:llama-3.1-8b",
        "prompt_len": 1000,
        "output_len": 1000,
        "max_batch_size": 512,
        "openorca_requests": 1000,
        "num_blocks": 0,  # from free device memory
        "max_model_len": 4096,
        "max_input_len": None,
        "max_output_len": None,
    }
    cpu = {
        "model": "random:small",
        "prompt_len": 48,
        "output_len": 24,
        "max_batch_size": 16,
        "openorca_requests": 24,
        "num_blocks": 41,  # 8 fixed requests of 5 blocks, and the null block
        "max_model_len": 512,
        "max_input_len": 64,
        "max_output_len": 12,
    }
    s = cpu if quick else gpu
    given = {k: getattr(args, k) for k in s if getattr(args, k, None) is not None}
    return {**s, **given, "quick": quick, "device": "cpu" if quick else "cuda"}


def progress(phase: str, data) -> None:
    print(f"bench_max_throughput: {phase}: {json.dumps(data)}", file=sys.stderr, flush=True)


def node_config(s: dict, overrides: list[str]):
    from greenroom.config import parse_override

    return load_config(
        overrides={
            "port": 0,
            "log_level": "warning",
            "model.path": s["model"],
            "model.device": s["device"],
            "model.max_model_len": s["max_model_len"],
            "model.cuda_graph_max_batch_size": s["max_batch_size"],
            "scheduler.max_batch_size": s["max_batch_size"],
            "scheduler.max_num_active_requests": max(1024, s["max_batch_size"]),
            "kv.num_blocks": s["num_blocks"],
            "kv.enable_prefix_reuse": False,
            **dict(parse_override(o) for o in overrides),
        }
    )


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


def fixed_requests(s: dict, vocab: int, pool_blocks: int, tpb: int) -> list[TraceRequest]:
    per_request = blocks_for(s["prompt_len"] + s["output_len"], tpb)
    n = min((pool_blocks - 1) // per_request, s["max_batch_size"])
    if n < 1:
        raise SystemExit(f"the KV pool ({pool_blocks} blocks) holds no {per_request}-block request")
    rows = [TraceRow(None, s["prompt_len"], s["output_len"])] * n
    return build_requests(rows, vocab_size=vocab, seed=11)


def openorca_requests(s: dict, vocab: int, pool_blocks: int, tpb: int) -> list[TraceRequest]:
    with resources.as_file(resources.files("greenroom").joinpath(OPENORCA_SLICE)) as path:
        reqs = load_trace(
            path,
            vocab_size=vocab,
            max_model_len=s["max_model_len"],
            seed=12,
            max_requests=s["openorca_requests"],
            max_input_len=s["max_input_len"],
            max_output_len=s["max_output_len"],
        )
    out, used = [], 1
    for r in reqs:  # as many as the pool holds at their full length
        need = blocks_for(r.prompt_length + r.max_tokens, tpb)
        if used + need > pool_blocks:
            break
        out.append(r)
        used += need
    return out


async def replay_in_process(address: str, requests: list[TraceRequest], seed: int) -> dict:
    """Every request sent at once by `greenroom replay` in a child process (prompts are its
    own synthetic tokens of the same lengths); its report's throughput and latencies."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "lengths.csv"
        trace.write_text(
            "input_length,output_length\n"
            + "".join(f"{r.prompt_length},{r.max_tokens}\n" for r in requests)
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "greenroom.replay.cli",
            str(trace),
            "--server",
            address,
            "--time-scale",
            "0",
            "--seed",
            str(seed),
            "--out",
            str(Path(tmp) / "out"),
            "--no-plots",
            "--quiet",
            "--timeout",
            "3600",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"greenroom replay failed: {err.decode()[-2000:]}")
        report = json.loads((Path(tmp) / "out" / "report.json").read_text())
    if report["num_failed"] or report["num_short_outputs"]:
        raise RuntimeError(f"replay: {report['num_failed']} failed, {report['failures']}")
    return {
        "num_requests": report["num_completed"],
        "output_tokens": report["total_output_tokens"],
        "seconds": report["duration_s"],
        "output_tokens_per_s": report["output_throughput"],
        "ttft_ms_p50": report["ttft_ms"]["p50"],
        "tpot_ms_p50": report["tpot_ms"]["p50"],
    }


async def run_set(
    client, engine, requests: list[TraceRequest], roofline, args, address: str
) -> dict:
    from greenroom.actors.step_profile import EngineProfileQuery
    from greenroom.heap import gc_pauses

    await engine.ask(EngineProfileQuery(reset=True, gpu_timing=args.gpu_timing), timeout=30)
    pauses, since = gc_pauses(), time.perf_counter()
    clocks = (
        ClockSampler(smi_id(torch.cuda.current_device())) if torch.cuda.is_available() else None
    )
    if clocks is not None:
        clocks.start()
    try:
        if args.client == "process":
            measured = await replay_in_process(address, requests, seed=len(requests))
        else:
            measured = await offline_throughput(client, requests)
    finally:
        summary = clocks.stop() if clocks is not None else None
    answer = await engine.ask(EngineProfileQuery(reset=True, steps=True), timeout=30)
    profile = answer.to_dict()
    gpu_s = [
        profile[k].get("forward_gpu_s_total", 0.0 if not profile[k]["steps"] else None)
        for k in ("decode", "other")
    ]
    busy = sum(gpu_s) / measured["seconds"] if None not in gpu_s else None
    return {
        "requests": len(requests),
        "mean_prompt_tokens": sum(r.prompt_length for r in requests) / len(requests),
        "mean_output_tokens": sum(r.max_tokens for r in requests) / len(requests),
        "measured": measured,
        "roofline": roofline.to_dict(),
        "of_roofline": measured["output_tokens_per_s"] / roofline.output_tokens_per_s,
        # against the bound with each decode step's attention and matmuls run one after the other
        "of_serial_bound": roofline.serial_seconds / measured["seconds"],
        "client": args.client,
        "engine_profile": profile,
        # forwards' device time over the run's wall time (--gpu-timing)
        "gpu_busy_fraction": busy,
        # the SM clock and power draw during the set (the ceilings were measured in bursts)
        "gpu_clocks": summary.to_dict() if summary is not None else None,
        # collections in this process (frontend, scheduler, KV manager; the engine's own
        # process reports its in engine_profile.gc)
        "node_gc": pauses.summary(since),
        "steps": answer.steps,
    }


async def serve(s: dict, args, arch: ArchConfig, dtype, ceilings) -> dict:
    from greenroom.client import AsyncClient
    from greenroom.node import Node

    cfg = node_config(s, args.set)
    t0 = time.perf_counter()
    node = await Node.start(cfg)
    out: dict = {
        "node_start_s": time.perf_counter() - t0,
        "kv_blocks": node.info.num_blocks,
        "engine_host": cfg.resolved_engine_host(torch.cuda.is_available()),
    }
    vocab, tpb, blocks = node.info.vocab_size, node.info.tokens_per_block, node.info.num_blocks
    batch = s["max_batch_size"]
    try:
        async with AsyncClient(node.address, timeout=3600) as client:
            warm = build_requests(
                [TraceRow(None, min(n, s["prompt_len"]), 4) for n in (700, 60, 1500, 200)],
                vocab_size=vocab,
                seed=13,
            )
            await offline_throughput(client, warm)  # first-use compiles stay out of the runs
            engine = node.refs["mixed"]
            if not args.no_fixed:
                reqs = fixed_requests(s, vocab, blocks, tpb)
                lengths = [(r.prompt_length, r.max_tokens) for r in reqs]
                roof = serving_roofline(lengths, batch, arch, dtype, ceilings)
                out["fixed"] = await run_set(client, engine, reqs, roof, args, node.address)
                progress("fixed", out["fixed"])
            if s["openorca_requests"] > 0:
                reqs = openorca_requests(s, vocab, blocks, tpb)
                lengths = [(r.prompt_length, r.max_tokens) for r in reqs]
                roof = serving_roofline(lengths, batch, arch, dtype, ceilings)
                out["openorca"] = await run_set(client, engine, reqs, roof, args, node.address)
                progress("openorca", out["openorca"])
    finally:
        await node.stop()
    return out


def main() -> None:
    args = parse_args()
    s = settings(args)
    device = torch.device(s["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    arch = ArchConfig.from_dict(preset_config(s["model"]), source=s["model"])
    dtype = resolve_dtype("auto", arch, device)
    ceilings = measure_ceilings(device, dtype)
    progress("ceilings", ceilings.to_dict())
    served = asyncio.run(serve(s, args, arch, dtype, ceilings))
    fixed = served.get("fixed")
    trace = {k: served[k].pop("steps") for k in ("fixed", "openorca") if k in served}
    if args.step_trace is not None:
        from greenroom.actors.step_profile import STEP_FIELDS

        args.step_trace.write_text(json.dumps({"fields": STEP_FIELDS, **trace}))
    result = {
        "benchmark": "bench_max_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": s["model"],
        "dtype": str(dtype).removeprefix("torch."),
        "quick": s["quick"],
        "ceilings": ceilings.to_dict(),
        "max_batch_size": s["max_batch_size"],
        **served,
        "targets": {
            "fixed_of_roofline": {
                "target": TARGET_FIXED,
                "value": fixed["of_roofline"] if fixed else None,
                "prompt_len": s["prompt_len"],
                "output_len": s["output_len"],
            },
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
