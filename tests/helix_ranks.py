"""Rank bodies for Helix tests: each spawned process joins a gloo group on loopback."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from greenroom.kv.helix_placement import HelixPlacement
from greenroom.models.helix_attention import helix_decode_attention

HEADS, KV_HEADS, HEAD_DIM = 6, 3, 8


def sequences(cases: list[tuple[int, int]], seed: int = 0):
    """Query and full (global-order) K/V of every request, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(cases), HEADS, HEAD_DIM, generator=g)
    kv = [
        (
            torch.randn(p + n, KV_HEADS, HEAD_DIM, generator=g),
            torch.randn(p + n, KV_HEADS, HEAD_DIM, generator=g),
        )
        for p, n in cases
    ]
    return q, kv


def shard_inputs(cases, kv, placement: HelixPlacement, rank: int):
    """This rank's paged cache and each request's block table and length on this rank."""
    tpb = placement.tokens_per_block
    slots: list[tuple[torch.Tensor, torch.Tensor]] = []
    tables: list[list[int]] = []
    lens: list[int] = []
    for (p, n), (k, v) in zip(cases, kv, strict=True):
        positions = placement.positions_on_rank(p + n, rank)
        table = []
        for start in range(0, len(positions), tpb):
            idx = torch.tensor(positions[start : start + tpb])
            table.append(len(slots))
            slots.append((k[idx], v[idx]))
        tables.append(table)
        lens.append(len(positions))
        assert len(positions) == placement.shard_length(p + n, rank)
    k_cache = torch.zeros(len(slots) + 1, tpb, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    for i, (k, v) in enumerate(slots):
        k_cache[i, : len(k)], v_cache[i, : len(v)] = k, v
    width = max(1, max(len(t) for t in tables))
    null = len(slots)  # an all-zero block, never read below a shard's length
    block_tables = torch.tensor([t + [null] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32)


def decode_rank(rank: int, world: int, port: int, tpb: int, cases, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        placement = HelixPlacement(cp_size=world, tokens_per_block=tpb)
        q, kv = sequences(cases)
        inputs = shard_inputs(cases, kv, placement, rank)
        out = helix_decode_attention(q, *inputs, scale=HEAD_DIM**-0.5, group=dist.group.WORLD)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
