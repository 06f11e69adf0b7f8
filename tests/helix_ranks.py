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
    """This rank's paged cache and the block tables / lengths of its two runs per request."""
    tpb = placement.tokens_per_block
    slots: list[tuple[torch.Tensor, torch.Tensor]] = []
    tables: dict[str, list[list[int]]] = {"prompt": [], "decode": []}
    lens: dict[str, list[int]] = {"prompt": [], "decode": []}
    for (p, n), (k, v) in zip(cases, kv, strict=True):
        positions = placement.positions_on_rank(p, n, rank)
        prompt_len, decode_len = placement.shard_lengths(p, n, rank)
        runs = {"prompt": positions[:prompt_len], "decode": positions[prompt_len:]}
        assert len(runs["decode"]) == decode_len
        for name, pos in runs.items():
            table = []
            for start in range(0, len(pos), tpb):
                idx = torch.tensor(pos[start : start + tpb])
                table.append(len(slots))
                slots.append((k[idx], v[idx]))
            tables[name].append(table)
            lens[name].append(len(pos))
    k_cache = torch.zeros(len(slots) + 1, tpb, KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    for i, (k, v) in enumerate(slots):
        k_cache[i, : len(k)], v_cache[i, : len(v)] = k, v

    def pad(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        null = len(slots)  # an all-zero block: never read below a run's length
        return torch.tensor([r + [null] * (width - len(r)) for r in rows], dtype=torch.int32)

    return (
        k_cache,
        v_cache,
        pad(tables["prompt"]),
        torch.tensor(lens["prompt"], dtype=torch.int32),
        pad(tables["decode"]),
        torch.tensor(lens["decode"], dtype=torch.int32),
    )


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
