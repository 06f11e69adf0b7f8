"""Prefix-reuse benchmark helpers: Mooncake trace requests at a chosen block scale, the ideal
hit rate of an unbounded cache, and one replay per KV mode against a real node.

Mooncake rows name one hash id per 512-token prompt block. ``tokens_per_hash_block`` maps each
of those blocks to fewer tokens (16 on CPU: one KV block per hash block) and scales prompt
lengths by the same factor, so the trace's sharing structure stays exactly as recorded while
prefills shrink. At 512 the prompts equal the replay tool's (``build_requests``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from greenroom.replay.readers import TraceRow
from greenroom.replay.tokens import BLOCK_TOKENS, BlockTokenCache, request_tokens
from greenroom.replay.trace import TraceRequest, fit_lengths

MODES = ("no_reuse", "gpu_reuse", "host_tier")


def shared_prefix_len(rows: Sequence[TraceRow]) -> int:
    """How many leading hash ids every row shares (a system prompt in front of all)."""
    if not rows:
        return 0
    first = rows[0].hash_ids
    n = len(first)
    for row in rows[1:]:
        n = min(n, len(row.hash_ids))
        while n and row.hash_ids[:n] != first[:n]:
            n -= 1
        if not n:
            break
    return n


def conversation_key(row: TraceRow, skip: int) -> int | None:
    """The first hash id past the ``skip`` shared ones: every turn of one conversation starts
    with the blocks of its first turn, so the id names the conversation."""
    ids = row.hash_ids
    if not ids:
        return None
    return ids[skip] if skip < len(ids) else ids[-1]


def select_conversations(rows: Sequence[TraceRow], stride: int) -> list[TraceRow]:
    """Rows whose conversation key (:func:`conversation_key`) is a multiple of ``stride``, so
    whole conversations are kept or dropped together, also when every row starts with the same
    shared blocks."""
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    if stride == 1:
        return list(rows)
    skip = shared_prefix_len(rows)
    return [r for r in rows if (k := conversation_key(r, skip)) is not None and k % stride == 0]


def scaled_requests(
    rows: Sequence[TraceRow],
    *,
    vocab_size: int,
    tokens_per_hash_block: int = BLOCK_TOKENS,
    max_model_len: int | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """Requests in arrival order; each hash id becomes its block's first
    ``tokens_per_hash_block`` tokens and input lengths scale by ``tokens_per_hash_block/512``."""
    k = tokens_per_hash_block
    if not 1 <= k <= BLOCK_TOKENS:
        raise ValueError(f"tokens_per_hash_block must be in [1, {BLOCK_TOKENS}], got {k}")
    blocks = BlockTokenCache(vocab_size, seed)
    out = []
    for index, row in enumerate(rows):
        scaled = max(1, -(-row.input_length * k // BLOCK_TOKENS))
        length, max_tokens, clipped, capped = fit_lengths(
            scaled,
            row.output_length,
            max_model_len=max_model_len,
            max_input_len=max_input_len,
            max_output_len=max_output_len,
        )
        n_blocks = min(len(row.hash_ids), -(-length // k))
        parts = [blocks.get(h)[:k] for h in row.hash_ids[:n_blocks]]
        if n_blocks * k < length:
            parts.append(request_tokens(index, length - n_blocks * k, vocab_size, seed))
        out.append(
            TraceRequest(
                arrival_s=0.0 if row.arrival_s is None else row.arrival_s,
                prompt_token_ids=np.concatenate(parts)[:length],
                max_tokens=max_tokens,
                clipped=clipped,
                capped=capped,
                index=index,
                trace_input_length=row.input_length,
                trace_output_length=row.output_length,
            )
        )
    out.sort(key=lambda r: r.arrival_s)
    return out


@dataclass(frozen=True, slots=True)
class IdealHits:
    """Block lookups and hits of an unbounded cache, and the blocks it ends up holding."""

    lookup_blocks: int
    hit_blocks: int
    distinct_blocks: int

    @property
    def rate(self) -> float:
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0


def ideal_hits(prompts: Iterable[Sequence[int] | np.ndarray], tokens_per_block: int) -> IdealHits:
    """Replay ``prompts`` in order through a cache that never evicts, counted as the server
    counts: a lookup covers the whole blocks short of the last prompt token and stops at the
    first miss; every full prompt block is cached afterwards (keyed by its whole prefix)."""
    tpb = tokens_per_block
    seen: set[int] = set()
    lookups = hits = 0
    for prompt in prompts:
        arr = np.asarray(prompt, dtype=np.int64)
        eligible = max(0, (len(arr) - 1) // tpb)
        key, matching = 0, True
        for i in range(len(arr) // tpb):
            key = hash((key, arr[i * tpb : (i + 1) * tpb].tobytes()))
            if i < eligible:
                lookups += 1
                matching = matching and key in seen
                hits += matching
            seen.add(key)
    return IdealHits(lookups, hits, len(seen))


def kept_hash_blocks(request: TraceRequest, tokens_per_hash_block: int) -> int:
    """Hash blocks of its trace row that a (possibly cut) request's prompt still covers."""
    return -(-request.prompt_length // tokens_per_hash_block)


def trace_ideal_hits(
    rows: Sequence[TraceRow], kept_blocks: Sequence[int] | None = None
) -> IdealHits:
    """The trace's own measure: 512-token hash blocks, every listed block looked up in order,
    hits up to the first hash id not seen in an earlier row. ``kept_blocks[i]``: how many of
    row i's blocks the replayed prompt kept (blocks cut off by length caps are not counted)."""
    seen: set[int] = set()
    lookups = hits = 0
    for i, row in enumerate(rows):
        matching = True
        ids = row.hash_ids if kept_blocks is None else row.hash_ids[: kept_blocks[i]]
        for h in ids:
            lookups += 1
            matching = matching and h in seen
            hits += matching
        seen.update(ids)
    return IdealHits(lookups, hits, len(seen))


def mode_overrides(mode: str, gpu_blocks: int, host_blocks: int) -> dict[str, Any]:
    """Config overrides of one benchmark mode (``gpu_blocks`` 0: sized from memory)."""
    base: dict[str, Any] = {"kv.num_blocks": gpu_blocks}
    if mode == "no_reuse":
        return {**base, "kv.enable_prefix_reuse": False, "kv.host_blocks": 0}
    if mode == "gpu_reuse":
        return {**base, "kv.enable_prefix_reuse": True, "kv.host_blocks": 0}
    if mode == "host_tier":
        return {**base, "kv.enable_prefix_reuse": True, "kv.host_blocks": host_blocks}
    raise ValueError(f"mode {mode!r} is invalid: one of {MODES}")


async def run_mode(
    overrides: dict[str, Any],
    requests: Sequence[TraceRequest],
    *,
    time_scale: float,
    timeout_s: float = 600.0,
):
    """Start a node with ``overrides``, replay ``requests`` against it, and return the replay
    report with the node's KV and scheduler counters in ``report.run``."""
    from greenroom.client import AsyncClient
    from greenroom.config import load_config
    from greenroom.node import Node
    from greenroom.replay import replay

    cfg = load_config(overrides={"port": 0, **overrides})
    started = time.perf_counter()
    node = await Node.start(cfg)
    start_s = time.perf_counter() - started
    try:
        async with AsyncClient(node.address, timeout=timeout_s) as client:
            report = await replay(requests, client, time_scale=time_scale)
        kv = await node.kv_stats()
        sched = await node.scheduler_stats()
    finally:
        await node.stop()
    report.run = {
        "overrides": dict(overrides),
        "node_start_s": start_s,
        "device": node.info.device,
        "num_gpu_blocks": node.info.num_blocks,
        "kv_stats": msgspec.structs.asdict(kv),
        "scheduler_stats": sched,
    }
    return report


def mode_summary(report, max_num_tokens: int, ideal: IdealHits) -> dict[str, Any]:
    """The numbers the benchmark compares across modes, from one mode's report.

    ``hit_rate`` is over every request replayed: the blocks reused or onboarded by completed
    requests over the block lookups of all of them (``ideal.lookup_blocks``), so a failed
    request counts as all misses instead of leaving the ratio."""
    kv, sched, p = report.run["kv_stats"], report.run["scheduler_stats"], report.prefix
    node_rate = kv["hit_blocks"] / kv["lookups_blocks"] if kv["lookups_blocks"] else 0.0
    hits = p.reused_blocks + p.onboarded_blocks
    hit_rate = hits / ideal.lookup_blocks if ideal.lookup_blocks else 0.0
    return {
        "completed": report.num_completed,
        "failed": report.num_failed,
        "failures": dict(report.failures),
        "duration_s": round(report.duration_s, 3),
        "hit_rate": round(hit_rate, 4),
        "hit_rate_of_ideal": round(hits / ideal.hit_blocks, 4) if ideal.hit_blocks else None,
        "hit_rate_of_completed": round(p.hit_rate or 0.0, 4),
        "node_hit_rate": round(node_rate, 4),
        "reused_blocks": p.reused_blocks,
        "onboarded_blocks": p.onboarded_blocks,
        "missed_blocks": p.missed_blocks,
        "node_onboarded_blocks": kv["onboarded_blocks"],
        "node_offloaded_blocks": kv["offloaded_blocks"],
        "cached_token_fraction": p.cached_token_fraction,
        "prefill_tokens": sched.get("prefill_tokens", 0),
        "decode_tokens": sched.get("decode_tokens", 0),
        "plans": sched.get("plans", 0),
        "max_plan_tokens": sched.get("max_plan_tokens", 0),
        "max_num_tokens": max_num_tokens,
        "plans_over_budget": sched.get("plans_over_budget", 0),
        "preemptions": sched.get("preemptions", 0),
        "ttft_ms_p50": report.ttft_ms.p50,
        "ttft_ms_p99": report.ttft_ms.p99,
        "ttft_ms_mean": report.ttft_ms.mean,
        "e2e_ms_p50": report.e2e_ms.p50,
        "num_gpu_blocks": report.run["num_gpu_blocks"],
        "host_blocks": kv["host_blocks"],
    }
