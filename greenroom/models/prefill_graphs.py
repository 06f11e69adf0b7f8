"""CUDA graphs of prefill forwards at padded token counts (the SM-disaggregation context engine).

An eager 8B prefill launches a few hundred kernels from Python: about 10 ms of host work per
step on an H200 host, against 0.2-0.4 ms to load a batch and replay a graph
(scripts/bench_prefill_graphs.py). On a small context partition the GPU hides most of it; on a
large one, short prompts would wait for their launches.

A graph fixes every launch shape, so each captured size ``T`` runs a batch of at most ``T``
tokens over at most ``max_requests`` requests: tokens past the batch are padding (their KV
writes are dropped, or land in the null block on a CPU), requests past it are empty, and
prefill attention runs over a fixed-length tile list (:mod:`greenroom.kernels.prefill_tiles`)
built on the host per batch. The padded forward (:meth:`PrefillGraphs.padded_forward`) is
also what runs eagerly on a CPU, so its padding is tested without a GPU.
"""

from __future__ import annotations

import torch

from greenroom.kernels.prefill_tiles import TILE_BLOCK_M, max_tiles, prefill_tiles
from greenroom.models.batch import ForwardBatch
from greenroom.models.cuda_graphs import capture_forwards
from greenroom.models.host_copy import copy_from_host
from greenroom.models.kv_pool import NULL_BLOCK
from greenroom.models.llama import LlamaModel

# Requests per captured prefill (bigger batches run eagerly): the logits rows each graph
# keeps cost max_requests x vocab x 4 bytes per size.
DEFAULT_MAX_REQUESTS = 32


def default_token_sizes(max_num_tokens: int) -> list[int]:
    """64, 128, 256, then every multiple of 256 up to ``max_num_tokens`` (rounded up to 64):
    padding stays under a quarter of any batch past 1k tokens."""
    top = -(-max_num_tokens // TILE_BLOCK_M) * TILE_BLOCK_M
    sizes = [t for t in (64, 128) if t < top] + list(range(256, top, 256))
    return sorted({*sizes, top})


class PrefillGraphs:
    """Prefill forwards through graphs captured on ``stream`` (the context partition's).

    ``capture=False`` builds the static buffers only; :meth:`padded_forward` then runs the
    same padded forward eagerly (CPU tests).
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_pool: torch.Tensor,
        max_blocks_per_seq: int,
        token_sizes: list[int],
        max_requests: int = DEFAULT_MAX_REQUESTS,
        stream: torch.cuda.Stream | None = None,
        capture: bool = True,
    ) -> None:
        if not token_sizes or min(token_sizes) < 1 or max_requests < 1:
            raise ValueError("prefill graphs need token sizes >= 1 and max_requests >= 1")
        self.model, self.kv_pool = model, kv_pool
        self.token_sizes = sorted(set(token_sizes))
        self.max_requests = max_requests
        self.max_blocks_per_seq = max_blocks_per_seq
        device, tmax, rmax = kv_pool.device, self.token_sizes[-1], max_requests
        # Padding tokens write no KV on a GPU (the Triton kernel skips slot -1); the torch
        # reference has no skip, so on a CPU they write into the null block, as padded decode
        # rows do.
        self.pad_slot = -1 if device.type == "cuda" else NULL_BLOCK * kv_pool.shape[3]
        self.input_ids = torch.zeros(tmax, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tmax, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tmax,), self.pad_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (rmax, max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32, device=device
        )
        self.context_lens = torch.ones(rmax, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.zeros(rmax + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(rmax, dtype=torch.int64, device=device)
        self.device_tiles = {  # all unused until a batch is loaded
            t: torch.from_numpy(prefill_tiles([], [], max_tiles(t, rmax))).to(device)
            for t in self.token_sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self.graphs, self.outputs = capture_forwards(
                model,
                kv_pool,
                self.token_sizes,
                self.static_batch,
                stream or torch.cuda.Stream(device),
            )

    def static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables,
            context_lens=self.context_lens,
            cu_seqlens_q=self.cu_seqlens_q,
            logits_indices=self.logits_indices,
            max_seqlen_q=size,
            max_context_len=self.max_blocks_per_seq * self.kv_pool.shape[3],
            decode_only=False,
            attention_tiles=self.device_tiles[size],
        )

    def size_for(self, batch: ForwardBatch) -> int | None:
        """The smallest captured size that runs ``batch``, or None (run it eagerly)."""
        if (
            batch.all_logits
            or batch.host_lens is None
            or batch.num_requests > self.max_requests
            or batch.block_tables.shape[1] > self.max_blocks_per_seq
        ):
            return None
        return next((t for t in self.token_sizes if t >= batch.num_tokens), None)

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.size_for(batch) is not None

    def _load(self, batch: ForwardBatch, size: int) -> None:
        """Copy ``batch`` into the static buffers of ``size`` tokens, padding the rest."""
        n, b, width = batch.num_tokens, batch.num_requests, batch.block_tables.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        if size > n:  # stale ids and positions of padding are harmless; stale slots are not
            self.slot_mapping[n:size].fill_(self.pad_slot)
        self.block_tables[:b, :width].copy_(batch.block_tables, non_blocking=True)
        self.context_lens[:b].copy_(batch.context_lens, non_blocking=True)
        self.cu_seqlens_q[: b + 1].copy_(batch.cu_seqlens_q, non_blocking=True)
        self.logits_indices[:b].copy_(batch.logits_indices, non_blocking=True)
        if b < self.max_requests:  # empty requests: no queries, logits of row 0
            self.cu_seqlens_q[b + 1 :].fill_(n)
            self.logits_indices[b:].zero_()
        q_lens, context_lens = batch.host_lens
        arch = self.model.arch  # the tile order knows a window only when every layer slides
        window = min(arch.layer_windows) if arch.layer_windows else 0
        tiles = prefill_tiles(q_lens, context_lens, self.device_tiles[size].shape[1], window=window)
        copy_from_host(self.device_tiles[size], tiles)

    def _load_fitting(self, batch: ForwardBatch) -> int:
        size = self.size_for(batch)
        if size is None:
            raise ValueError("the batch does not fit the captured prefill sizes")
        self._load(batch, size)
        return size

    @torch.inference_mode()
    def padded_forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[B, vocab]`` of ``batch`` through the padded static buffers, eagerly."""
        size = self._load_fitting(batch)
        return self.model.forward(self.static_batch(size), self.kv_pool)[: batch.num_requests]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[B, vocab]`` of ``batch`` through the smallest graph that fits it."""
        size = self._load_fitting(batch)
        self.graphs[size].replay()
        return self.outputs[size][: batch.num_requests]


__all__ = ["DEFAULT_MAX_REQUESTS", "PrefillGraphs", "default_token_sizes"]
