"""CUDA graphs for decode steps at padded batch sizes.

Graphs are captured on a caller-given stream: a graph keeps the SM partition of the stream
it was captured on, so an engine on a green-context stream captures on that stream. Each
graph reads static input buffers; a replay copies the batch in, pads the remaining rows to
the null block (position 0, slot 0, context length 1) and returns the first B logit rows.

Launch shapes are fixed at capture: on an SM partition, capture inside `partition_sizing` so
split-K attention and cuBLASLt's kernel choice are sized for the partition's SMs (a grid sized
for the whole GPU runs in two waves on a part of it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from greenroom.models.batch import ForwardBatch
from greenroom.models.kv_pool import NULL_BLOCK
from greenroom.models.llama import LlamaModel


@contextlib.contextmanager
def partition_sizing(num_sms: int | None, blas_sm_target: bool = True) -> Iterator[None]:
    """Size the kernels launched (or captured) in this block for ``num_sms`` SMs.

    Decode attention's split-K follows ``num_sms``; with ``blas_sm_target`` matmuls go through
    cuBLASLt with its SM-count target set (torch's SM carveout). Both settings are process-wide
    while the block runs: use it where nothing else launches (graph capture at start-up).
    """
    if num_sms is None or not torch.cuda.is_available():
        yield
        return
    from greenroom.kernels.triton_decode_attention import sm_budget  # CUDA only: needs triton

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    carve = (
        blas_sm_target and num_sms < total and hasattr(torch._C, "_set_sm_carveout_experimental")
    )
    with sm_budget(num_sms):
        if not carve:
            yield
            return
        prev_lib = torch.backends.cuda.preferred_blas_library()
        prev_carveout = torch._C._get_sm_carveout_experimental()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(total - num_sms)
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(prev_carveout)
            torch.backends.cuda.preferred_blas_library(prev_lib)


def default_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size``."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


@torch.inference_mode()
def capture_forwards(
    model: LlamaModel,
    kv_pool: torch.Tensor,
    sizes: list[int],
    static_batch: Callable[[int], ForwardBatch],
    stream: torch.cuda.Stream,
    warmups: int = 1,
    greedy: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph per size of ``model.forward`` over ``static_batch(size)``, captured on
    ``stream`` into one private memory pool, largest first (smaller ones reuse its memory);
    returns (graphs, their output logits) by size. Each capture is preceded by ``warmups``
    eager forwards, so compiles, autotuning and lazy initialisation stay out of the graph.
    With ``greedy`` given, each graph also takes the logits' argmax, stored there by size:
    a greedy step then needs no sampling launch after the replay."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = torch.cuda.graph_pool_handle()
    stream.wait_stream(torch.cuda.current_stream())
    for size in sorted(sizes, reverse=True):
        batch = static_batch(size)
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                model.forward(batch, kv_pool)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs[size] = model.forward(batch, kv_pool)
            if greedy is not None:
                greedy[size] = outputs[size].argmax(dim=-1)
        graphs[size] = graph
    torch.cuda.current_stream().wait_stream(stream)
    return graphs, outputs


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_pool: torch.Tensor,
        max_blocks_per_seq: int,
        batch_sizes: list[int],
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_blocks_per_seq = max_blocks_per_seq
        device, bmax = kv_pool.device, self.batch_sizes[-1]
        self.input_ids = torch.zeros(bmax, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bmax, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((bmax,), NULL_BLOCK, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (bmax, max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32, device=device
        )
        self.context_lens = torch.ones(bmax, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(bmax + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(bmax, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}  # argmax of each graph's logits
        self._capture(stream or torch.cuda.Stream(device))

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            context_lens=self.context_lens[:size],
            cu_seqlens_q=self.cu_seqlens_q[: size + 1],
            logits_indices=self.logits_indices[:size],
            max_seqlen_q=1,
            max_context_len=self.max_blocks_per_seq * self.kv_pool.shape[3],
            decode_only=True,
        )

    def _capture(self, stream: torch.cuda.Stream) -> None:
        self.graphs, self.outputs = capture_forwards(
            self.model,
            self.kv_pool,
            self.batch_sizes,
            self._static_batch,
            stream,
            warmups=2,
            greedy=self.greedy,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.decode_only
            and not batch.all_logits
            and batch.num_requests <= self.batch_sizes[-1]
            and batch.block_tables.shape[1] <= self.max_blocks_per_seq
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits ``[B, vocab]`` of a decode batch through the smallest graph that fits it."""
        return self.run_greedy(batch)[0]

    def run_greedy(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[B, vocab]``, their argmax ``[B]``) of a decode batch, both computed by
        the replay. Both are views of the graph's outputs: the next replay of the same size
        overwrites them (stream-ordered, so work queued before it still reads this step's)."""
        b = batch.num_requests
        size = next(s for s in self.batch_sizes if s >= b)
        width = batch.block_tables.shape[1]
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.slot_mapping[:b].copy_(batch.slot_mapping)
        self.block_tables[:b, :width].copy_(batch.block_tables)
        self.block_tables[:b, width:].fill_(NULL_BLOCK)
        self.context_lens[:b].copy_(batch.context_lens)
        if size > b:
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.slot_mapping[b:size].fill_(NULL_BLOCK)
            self.block_tables[b:size].fill_(NULL_BLOCK)
            self.context_lens[b:size].fill_(1)
        self.graphs[size].replay()
        return self.outputs[size][:b], self.greedy[size][:b]
