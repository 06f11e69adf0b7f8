"""Helix context-parallel decode figures (library code behind scripts/bench_helix.py).

- KV balance: the KV manager serves a stream of requests (random prompt and output lengths,
  requests joining and finishing) on ``cp`` ranks; after every step, the spread between the
  fullest and the emptiest rank's held blocks. The baseline is the placement Helix replaces:
  prompt blocks round-robin but every decode token on the last rank.
- All-to-all bytes per decode step and layer, counted on the tensors the exchange sends, at
  several context lengths (they must not grow with the context).
- Decode attention time at ``cp`` ranks (each attends ``1 / cp`` of the context, then the
  exchange) against one rank attending the whole context.
- The whole model's decode step time at ``cp`` ranks against one rank at a long context
  (greenroom.bench.helix_step).

Ranks are spawned processes joined in one gloo (CPU) or NCCL (GPU) group on loopback.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from greenroom.bench.helix_step import join_bench_group, single_rank_step_ms, step_rank
from greenroom.bus.messages import KVAdmit, KVExtend, KVFree, KVStep
from greenroom.config import KVConfig
from greenroom.kv import KVCacheManager
from greenroom.kv.helix_placement import HelixPlacement


def kv_balance(cp: int, tokens_per_block: int, num_requests: int, seed: int = 0) -> dict:
    """Worst per-rank spread of held blocks over a run: Helix placement vs decode-on-last."""
    rng = random.Random(seed)
    specs = [(rng.randint(16, 400), rng.randint(16, 600)) for _ in range(num_requests)]
    bpr = 1 + sum(-(-(p + o) // tokens_per_block) for p, o in specs) // cp + num_requests
    mgr = KVCacheManager(KVConfig(tokens_per_block=tokens_per_block), cp * bpr, cp_size=cp)
    tpb = tokens_per_block
    live: dict[str, list[int]] = {}  # id -> [tokens so far, final length, prompt length]
    helix_spread = baseline_spread = 0
    step, pending = 0, list(enumerate(specs))
    while pending or live:
        admit = []
        if pending and (len(live) < 4 or rng.random() < 0.2):
            i, (p, o) = pending.pop(0)
            rid = f"r{i}"
            admit.append(KVAdmit(request_id=rid, token_ids=[3] * p, reserve_tokens=p))
            live[rid] = [p, p + o, p]
        extend, free = [], []
        for rid, st in live.items():
            if st[0] >= st[1]:
                free.append(KVFree(rid))
            elif rid in mgr.requests:
                st[0] += 1
                extend.append(KVExtend(rid, st[0]))
        res = mgr.step(KVStep(iteration=step, admit=admit, extend=extend, free=free))
        assert not res.rejected and not res.failed_extend, "the pool is sized for the run"
        for f in free:
            del live[f.request_id]
        step += 1
        held = [0] * cp
        naive = [0] * cp
        for rid, req in mgr.requests.items():
            for b in req.block_ids:
                held[b // bpr] += 1
            tokens, _, prompt = live[rid]
            prompt_blocks = -(-prompt // tpb)
            for j in range(prompt_blocks):
                naive[j % cp] += 1
            naive[cp - 1] += -(-(tokens - prompt_blocks * tpb) // tpb) if tokens > prompt else 0
        helix_spread = max(helix_spread, max(held) - min(held))
        baseline_spread = max(baseline_spread, max(naive) - min(naive))
    return {
        "steps": step,
        "max_spread_blocks": helix_spread,
        "baseline_max_spread_blocks": baseline_spread,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _paged(ctx: int, cp: int, rank: int, tpb: int, batch: int, kv_heads: int, dim: int, dev):
    """This rank's paged cache with ``batch`` requests of ``ctx`` tokens, and its inputs."""
    placement = HelixPlacement(cp_size=cp, tokens_per_block=tpb)
    held = placement.shard_length(ctx, rank)
    nblk = max(1, -(-held // tpb))
    g = torch.Generator(device="cpu").manual_seed(rank)
    k = torch.randn(batch * nblk + 1, tpb, kv_heads, dim, generator=g).to(dev)
    v = torch.randn_like(k)
    tables = torch.arange(1, batch * nblk + 1, dtype=torch.int32).view(batch, nblk).to(dev)
    lens = torch.full((batch,), held, dtype=torch.int32, device=dev)
    return k, v, tables, lens


def _rank(rank: int, cp: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from greenroom.models import helix_attention

    cuda = cfg["device"] == "cuda"
    dev = join_bench_group(rank, cp, port, cfg["device"], timeout_s=120)
    sent: list[int] = []
    real = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        # what leaves this rank: every slice but its own
        sent.append(input.numel() * input.element_size() * (cp - 1) // cp)
        return real(output, input, *args, **kwargs)

    helix_attention.dist.all_to_all_single = counting
    try:
        b, hq, hkv, d, tpb = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["tpb"]
        q = torch.randn(b, hq, d, device=dev)
        result: dict = {"bytes": {}, "ms": {}}
        for ctx in cfg["contexts"]:
            inputs = _paged(ctx, cp, rank, tpb, b, hkv, d, dev)
            sent.clear()
            helix_attention.helix_decode_attention(q, *inputs, d**-0.5, dist.group.WORLD)
            result["bytes"][ctx] = sum(sent)
            times = []
            for _ in range(cfg["reps"]):
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                helix_attention.helix_decode_attention(q, *inputs, d**-0.5, dist.group.WORLD)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            result["ms"][ctx] = statistics.median(times) * 1e3
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_rank_ms(cfg: dict, ctx: int) -> float:
    """Decode attention over the whole context on one rank (the cp = 1 baseline)."""
    from greenroom.kernels import ops

    dev = torch.device(cfg["device"])
    b, hq, hkv, d, tpb = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["dim"], cfg["tpb"]
    q = torch.randn(b, hq, d, device=dev)
    inputs = _paged(ctx, 1, 0, tpb, b, hkv, d, dev)
    times = []
    for _ in range(cfg["reps"] + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ops.paged_decode_attention(q, *inputs, d**-0.5)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def run(cp: int, cfg: dict, num_requests: int) -> dict:
    import torch.multiprocessing as mp

    balance = kv_balance(cp, cfg["tpb"], num_requests)
    with tempfile.TemporaryDirectory() as out_dir:
        env = os.environ.get("OMP_NUM_THREADS")
        mp.spawn(_rank, args=(cp, _free_port(), cfg, out_dir), nprocs=cp, join=True)
        mp.spawn(step_rank, args=(cp, _free_port(), cfg, out_dir), nprocs=cp, join=True)
        if env is not None:
            os.environ["OMP_NUM_THREADS"] = env
        ranks = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(cp)]
        step_cp_ms = max(torch.load(Path(out_dir) / f"step{r}.pt") for r in range(cp))
    if cfg["device"] == "cpu":
        torch.set_num_threads(1)
    step_one_ms = single_rank_step_ms(cfg)
    contexts = cfg["contexts"]
    per_ctx_bytes = {c: max(r["bytes"][c] for r in ranks) for c in contexts}
    longest = contexts[-1]
    cp_ms = max(r["ms"][longest] for r in ranks)
    one_ms = single_rank_ms(cfg, longest)
    return {
        "cp_size": cp,
        "device": cfg["device"],
        "kv_max_spread_blocks": balance["max_spread_blocks"],
        "kv_baseline_max_spread_blocks": balance["baseline_max_spread_blocks"],
        "kv_spread_vs_baseline": balance["max_spread_blocks"]
        / max(1, balance["baseline_max_spread_blocks"]),
        "all_to_all_bytes_per_layer_step": {str(c): per_ctx_bytes[c] for c in contexts},
        "all_to_all_bytes_growth": max(per_ctx_bytes.values()) / min(per_ctx_bytes.values()),
        "longest_context": longest,
        "decode_attention_ms_cp": cp_ms,
        "decode_attention_ms_cp1": one_ms,
        "decode_attention_speedup": one_ms / cp_ms,
        "step_model": cfg["model"],
        "step_batch": cfg["step_batch"],
        "step_context": cfg["step_context"],
        "decode_step_ms_cp": step_cp_ms,
        "decode_step_ms_cp1": step_one_ms,
        "decode_step_speedup": step_one_ms / step_cp_ms,
    }
