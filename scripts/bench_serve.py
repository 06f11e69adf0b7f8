"""Serving-path benchmark: runtime overhead, a trace load sweep and the transformers peer,
all measured in one run on one device.

(a) overhead: --batch requests decoding together (64 and 256 on a GPU), steady state (prefill
    and the first decode steps left out). greenroom = a node (frontend, scheduler, KV manager,
    engine actors) driven by AsyncClient streams; baseline = a bare loop calling PlanExecutor
    directly with the same plans on the same model, each plan launched before the previous
    one's tokens are read (as the engine does; once more without, as "bare_plain"). Ratio
    greenroom / bare, for the default engine in its own process and again on a thread, and
    each against the decode roofline of the same run: (weights + the batch's KV) per step at
    the device copy bandwidth measured in this run. Each side reports its step timeline.
(b) load sweep: the first --sweep-requests rows of the Azure conversation trace replayed at
    several multiples of their recorded arrival rate; output tokens/s, TTFT and TPOT p99 per
    load. Each load gets its own prompts (no KV reuse between loads).
(c) peer: the first --peer-requests rows of the OpenOrca length set (all sent at once) through
    the node and through transformers' continuous batching on the same weights; ratio of
    output tokens/s greenroom / transformers (target >= 10).

GPU (default when CUDA is present): random bf16 weights of --model (Llama-3.1-8B shape), made
on the device; 64 requests x 2048-token prompts for (a). --quick: the small preset on CPU with
tiny shapes (< 90 s). Prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from greenroom.bench.roofline import (
    DeviceCeilings,
    kv_bytes_per_token,
    measure_ceilings,
    weight_bytes,
)
from greenroom.bench.serve import (
    DecodeWorkload,
    bare_decode,
    load_sweep,
    offline_throughput,
    served_decode,
)
from greenroom.bus.messages import SamplingParams
from greenroom.config import KVConfig, ModelConfig, load_config
from greenroom.logging import configure_logging
from greenroom.models.arch import ArchConfig
from greenroom.models.executor import PlanExecutor
from greenroom.models.loader import random_weights
from greenroom.models.presets import preset_config
from greenroom.models.runner import ModelRunner, resolve_dtype
from greenroom.replay.bundled import AZURE_CONV, bundled_trace
from greenroom.replay.bundled import OPENORCA as OPENORCA_SLICE

# bundled slices (greenroom/data/SOURCE.md); pass the full public traces for real runs
AZURE = bundled_trace(AZURE_CONV)
OPENORCA = bundled_trace(OPENORCA_SLICE)
TOKENS_PER_BLOCK = 16
DECODE_SEED = 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small preset on CPU, tiny shapes (< 90 s)")
    p.add_argument("--model", default=None, help="random-weight preset (GPU: random:llama-3.1-8b)")
    p.add_argument(
        "--batch", default=None, help="(a) requests decoding together, comma-separated (64,256)"
    )
    p.add_argument("--context", type=int, default=None, help="(a) prompt tokens (GPU 2048)")
    p.add_argument("--decode-tokens", type=int, default=None, help="(a) tokens per request")
    p.add_argument("--warmup-tokens", type=int, default=None, help="(a) tokens left out")
    p.add_argument("--repeats", type=int, default=None, help="(a) runs of each side; best kept")
    p.add_argument("--azure-trace", default=str(AZURE), help="(b) Azure conversation CSV")
    p.add_argument("--sweep-requests", type=int, default=None, help="(b) trace rows replayed")
    p.add_argument("--loads", default=None, help="(b) comma-separated arrival-rate multiples")
    p.add_argument("--peer-trace", default=str(OPENORCA), help="(c) input/output length CSV")
    p.add_argument("--peer-requests", type=int, default=None, help="(c) rows of the length set")
    p.add_argument("--max-input-len", type=int, default=None, help="cap trace prompts (quick)")
    p.add_argument("--max-output-len", type=int, default=None, help="cap trace outputs (quick)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-sweep", action="store_true", help="skip (b)")
    p.add_argument(
        "--no-process-engine",
        action="store_true",
        help="(a): skip the node with the non-default engine host (thread on a GPU)",
    )
    p.add_argument(
        "--transformers-timeout", type=float, default=180.0, help="(c) seconds before giving up"
    )
    p.add_argument("--no-transformers", action="store_true", help="skip transformers in (c)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node config override, e.g. --set scheduler.plans_in_flight=3 (repeatable)",
    )
    return p.parse_args()


def settings(args: argparse.Namespace) -> dict:
    quick = args.quick or not torch.cuda.is_available()
    gpu = {
        "device": "cuda",
        "model": "random:llama-3.1-8b",
        "batch": "64,256",
        "context": 2048,
        "decode_tokens": 256,
        "warmup_tokens": 16,
        "repeats": 2,
        "sweep_requests": 200,
        "loads": "4,8,16",
        "peer_requests": 256,
        "max_input_len": None,
        "max_output_len": None,
        "max_model_len": 16384,
    }
    cpu = {
        "device": "cpu",
        "model": "random:small",
        "batch": "16",
        "context": 32,
        "decode_tokens": 48,
        "warmup_tokens": 8,
        "repeats": 3,
        "sweep_requests": 12,
        "loads": "8,32",
        "peer_requests": 12,
        "max_input_len": 64,
        "max_output_len": 16,
        "max_model_len": 1024,
    }
    s = cpu if quick else gpu
    given = {k: getattr(args, k) for k in s if getattr(args, k, None) is not None}
    return {**s, **given, "quick": quick, "overrides": list(args.overrides)}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def progress(phase: str, data) -> None:
    """One line per finished phase on stderr (stdout's last line is the result)."""
    print(f"bench_serve: {phase}: {json.dumps(data)}", file=sys.stderr, flush=True)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trace_requests(path: str, s: dict, n: int, vocab: int, seed: int = 0):
    from greenroom.replay import load_trace

    return load_trace(
        path,
        vocab_size=vocab,
        max_model_len=s["max_model_len"],
        seed=seed,
        max_requests=n,
        max_input_len=s["max_input_len"],
        max_output_len=s["max_output_len"],
    )


def node_config(s: dict, engine_host: str):
    from greenroom.config import parse_override

    return load_config(
        overrides={
            "port": 0,
            "model.device": s["device"],
            "log_level": "warning",
            "engine_host": engine_host,
            "model.path": s["model"],
            "model.max_model_len": s["max_model_len"],
            "model.cuda_graph_max_batch_size": 256,
            "kv.tokens_per_block": TOKENS_PER_BLOCK,
            **dict(parse_override(o) for o in s.get("overrides", ())),
        }
    )


async def node_decode(node, client, works, prompt_sets, host: str) -> dict[int, dict]:
    """(a) through a node, per batch: best of one run per prompt set, after a short warm-up,
    with the engine's step timeline of the best run."""
    from greenroom.actors.step_profile import EngineProfileQuery

    engine = node.refs["mixed"]
    warm = [p[-8:] for p in prompt_sets[0][0][:4]]  # not a prefix of any measured prompt
    await asyncio.gather(*(client.generate(p, SamplingParams(max_tokens=4)) for p in warm))
    out = {}
    for k, work in enumerate(works):
        runs, profiles = [], []
        for r, prompts in enumerate(prompt_sets[k]):
            await engine.ask(EngineProfileQuery(reset=True), timeout=30)
            runs.append(await served_decode(client, prompts, work, tag=f"decode{k}-{r}"))
            profiles.append((await engine.ask(EngineProfileQuery(), timeout=30)).to_dict())
        progress(
            f"greenroom decode, batch {work.num_requests}, engine on a {host}",
            [r.tokens_per_s for r in runs],
        )
        best = max(range(len(runs)), key=lambda i: runs[i].tokens_per_s)
        out[work.num_requests] = {
            **runs[best].to_dict(),
            "engine_host": host,
            "runs_tokens_per_s": [r.tokens_per_s for r in runs],
            "engine_decode_profile": profiles[best]["decode"],
        }
    return out


async def decode_phase(s: dict, works, prompt_sets, host: str) -> dict[int, dict]:
    from greenroom.client import AsyncClient
    from greenroom.node import Node

    node = await Node.start(node_config(s, host))
    try:
        async with AsyncClient(node.address) as client:
            return await node_decode(node, client, works, prompt_sets, host)
    finally:
        await node.stop()


async def serve_phase(s: dict, args, works, prompt_sets, peer_requests) -> dict:
    """The node with the default engine host: (a), then (b) and greenroom's side of (c)."""
    from greenroom.client import AsyncClient
    from greenroom.node import Node

    cfg = node_config(s, "auto")
    configure_logging(cfg.log_format, cfg.log_level)
    host = cfg.resolved_engine_host(torch.cuda.is_available())
    t0 = time.perf_counter()
    node = await Node.start(cfg)
    out: dict = {"node_start_s": time.perf_counter() - t0, "node_kv_blocks": node.info.num_blocks}
    try:
        async with AsyncClient(node.address) as client:
            out["served"] = await node_decode(node, client, works, prompt_sets, host)
            out["engine_host"] = host
            if not args.no_sweep:
                loads = [float(x) for x in s["loads"].split(",")]
                sets = [
                    trace_requests(
                        args.azure_trace, s, s["sweep_requests"], node.info.vocab_size, seed=1 + i
                    )
                    for i in range(len(loads))
                ]
                t = time.perf_counter()
                out["sweep"] = await load_sweep(client, sets, loads)
                out["sweep_s"] = time.perf_counter() - t
                progress("sweep", out["sweep"])
            out["peer"] = None
            if peer_requests:
                out["peer"] = await offline_throughput(client, peer_requests)
                progress("greenroom peer set", out["peer"])
    finally:
        await node.stop()
    return out


def decode_roofline(work: DecodeWorkload, arch, dtype, ceilings: DeviceCeilings) -> float:
    """Tokens/s of (a)'s measured steps at the roofline: each step reads every weight and the
    KV of every request's context (mean context over the measured steps)."""
    context = work.prompt_len + (work.warmup_tokens + work.max_tokens) / 2
    step_bytes = weight_bytes(arch, dtype) + work.num_requests * context * kv_bytes_per_token(
        arch, dtype
    )
    return work.num_requests * ceilings.copy_bytes_per_s / step_bytes


def main() -> None:
    args = parse_args()
    s = settings(args)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    device = torch.device(s["device"])
    if device.type == "cpu":
        # one intra-op thread: the engine thread and the event loop each get a core on a
        # 2-core machine, and a busy machine does not stall a spinning thread pool
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the same for a process-hosted engine
    preset = s["model"]
    arch_dict = preset_config(preset)
    arch = ArchConfig.from_dict(arch_dict, source=preset)
    dtype = resolve_dtype("auto", arch, device)
    batches = [int(b) for b in str(s["batch"]).split(",")]
    works = [
        DecodeWorkload(b, s["context"], s["decode_tokens"], s["warmup_tokens"]) for b in batches
    ]
    # a fresh prompt set per repeat, so the node's prefix cache cannot carry one over; seeds
    # apart from the trace prompts' (0 for the peer set, 1.. for the sweep loads): equal seeds
    # make a shorter prompt of the same index a prefix of a longer one
    prompt_sets = [
        [w.prompts(arch.vocab_size, seed=DECODE_SEED + 10 * k + r) for r in range(s["repeats"])]
        for k, w in enumerate(works)
    ]
    timings: dict[str, float] = {}
    ceilings = measure_ceilings(device, dtype)
    progress("ceilings", ceilings.to_dict())

    # (a) the bare loop: weights made once, shared with the transformers peer below
    t = time.perf_counter()
    weights = random_weights(arch, dtype, device, seed=0)
    model_cfg = ModelConfig(
        path=preset, max_model_len=s["max_model_len"], cuda_graph_max_batch_size=256
    )
    largest = max(works, key=lambda w: w.num_requests)
    per_request = -(-(largest.prompt_len + largest.max_tokens) // TOKENS_PER_BLOCK)
    kv_cfg = KVConfig(
        tokens_per_block=TOKENS_PER_BLOCK, num_blocks=2 + largest.num_requests * per_request
    )
    runner = ModelRunner.from_weights(model_cfg, kv_cfg, arch, weights, device, preset)
    executor = PlanExecutor(runner)
    warm_prompts = prompt_sets[0][0][:4]
    bare_decode(executor, warm_prompts, DecodeWorkload(4, largest.prompt_len, 8, 2))
    bare: dict[int, dict] = {}
    for k, work in enumerate(works):
        runs = [bare_decode(executor, prompts, work) for prompts in prompt_sets[k]]
        plain = bare_decode(executor, prompt_sets[k][0], work, overlap=False)
        best = max(runs, key=lambda r: r.tokens_per_s)
        bare[work.num_requests] = {
            **best.to_dict(),
            "runs_tokens_per_s": [r.tokens_per_s for r in runs],
            "plain": plain.to_dict(),
        }
        progress(
            f"bare decode, batch {work.num_requests}",
            {"overlapped": [r.tokens_per_s for r in runs], "plain": plain.tokens_per_s},
        )
    del executor, runner
    free_device_memory()
    timings["bare_s"] = time.perf_counter() - t

    # (c) transformers on the same weights and request subset
    peer_requests = trace_requests(args.peer_trace, s, s["peer_requests"], arch.vocab_size)
    hf: dict = {"skipped": True}
    if not args.no_transformers and peer_requests:
        from greenroom.bench.transformers_peer import generate_continuous, hf_llama

        t = time.perf_counter()
        model = hf_llama(arch_dict, arch, weights, device)
        cb = {"num_blocks": 256, "max_batch_tokens": 512} if device.type == "cpu" else {}
        try:
            hf = generate_continuous(
                model,
                [r.prompt_token_ids.tolist() for r in peer_requests],
                [r.max_tokens for r in peer_requests],
                cb,
                result_timeout_s=args.transformers_timeout,
            )
        except Exception as exc:  # the peer must not hide greenroom's own numbers
            hf = {"error": f"{type(exc).__name__}: {exc}"}
        progress("transformers peer set", hf)
        del model
        timings["transformers_s"] = time.perf_counter() - t
    del weights
    free_device_memory()

    # (a) with the other engine host first (a process-hosted engine's memory goes with its
    # process), then the default node for (a), (b) and greenroom's side of (c)
    t = time.perf_counter()
    default_host = node_config(s, "auto").resolved_engine_host(torch.cuda.is_available())
    other_host = "thread" if default_host == "process" else "process"
    other = None
    if not args.no_process_engine:
        configure_logging("auto", "warning")
        other = asyncio.run(decode_phase(s, works, prompt_sets, other_host))
        free_device_memory()
    served = asyncio.run(serve_phase(s, args, works, prompt_sets, peer_requests))
    timings["node_s"] = time.perf_counter() - t

    by_host = {default_host: served["served"], **({other_host: other} if other else {})}
    by_batch = {}
    for work in works:
        b = work.num_requests
        roof = decode_roofline(work, arch, dtype, ceilings)
        row = {
            "batch": b,
            "roofline_tokens_per_s": roof,
            "bare": bare[b],
            "bare_of_roofline": bare[b]["tokens_per_s"] / roof,
            "bare_plain_of_roofline": bare[b]["plain"]["tokens_per_s"] / roof,
        }
        for host, rates in by_host.items():
            row[f"greenroom_{host}_engine"] = rates[b]
            row[f"{host}_engine_over_bare"] = rates[b]["tokens_per_s"] / bare[b]["tokens_per_s"]
            row[f"{host}_engine_of_roofline"] = rates[b]["tokens_per_s"] / roof
        by_batch[str(b)] = row
    first = by_batch[str(works[0].num_requests)]
    overhead_ratio = first[f"{default_host}_engine_over_bare"]
    process_ratio = first.get("process_engine_over_bare")
    thread_ratio = first.get("thread_engine_over_bare")
    peer_ratio = (
        served["peer"]["output_tokens_per_s"] / hf["output_tokens_per_s"]
        if "output_tokens_per_s" in hf
        else None
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    targets = {
        "greenroom_over_bare": {"target": 0.98, "value": overhead_ratio},
        "greenroom_process_engine_over_bare": {"target": 0.98, "value": process_ratio},
        "greenroom_thread_engine_over_bare": {"target": 0.95, "value": thread_ratio},
        "greenroom_over_transformers": {"target": 10.0, "value": peer_ratio},
    }
    for b, row in by_batch.items():
        targets[f"node_of_roofline_batch_{b}"] = {
            "target": 0.80,
            "value": row[f"{default_host}_engine_of_roofline"],
        }
    result = {
        "benchmark": "bench_serve",
        "device": name,
        "model": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": s["quick"],
        "ceilings": ceilings.to_dict(),
        "overhead": {
            "batch": works[0].num_requests,
            "context": works[0].prompt_len,
            "decode_tokens": works[0].max_tokens,
            "warmup_tokens": works[0].warmup_tokens,
            "repeats": s["repeats"],
            "default_engine_host": default_host,
            "bare": bare[works[0].num_requests],
            "greenroom": served["served"][works[0].num_requests],
            "ratio": overhead_ratio,
            "greenroom_process_engine": (by_host.get("process") or {}).get(works[0].num_requests),
            "ratio_process_engine": process_ratio,
            "greenroom_thread_engine": (by_host.get("thread") or {}).get(works[0].num_requests),
            "ratio_thread_engine": thread_ratio,
            "by_batch": by_batch,
        },
        "sweep": {
            "trace": Path(args.azure_trace).name,
            "requests_per_load": s["sweep_requests"],
            "rows": served.get("sweep", []),
        },
        "peer": {
            "trace": Path(args.peer_trace).name,
            "subset": f"first {len(peer_requests)} rows, all sent at once",
            "mean_prompt_tokens": mean([r.prompt_length for r in peer_requests]),
            "mean_output_tokens": mean([r.max_tokens for r in peer_requests]),
            "greenroom": served["peer"],
            "transformers": hf,
            "ratio": peer_ratio,
        },
        "ratios": {
            "greenroom_over_bare": overhead_ratio,
            "greenroom_process_engine_over_bare": process_ratio,
            "greenroom_thread_engine_over_bare": thread_ratio,
            "greenroom_over_transformers": peer_ratio,
        },
        "targets": targets,
        "node": {"start_s": served["node_start_s"], "kv_blocks": served["node_kv_blocks"]},
        "phase_seconds": timings,
    }
    # the sweep's failed requests; a lost request elsewhere raises (offline_throughput)
    result["lost_requests"] = sum(r["num_failed"] for r in result["sweep"]["rows"])
    print(json.dumps(result))
    if result["lost_requests"]:
        print(f"bench_serve: {result['lost_requests']} requests failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
