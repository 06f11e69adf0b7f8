"""Decode steps as two nano-batches whose attention and matmuls overlap.

A large decode step spends its time in two phases that load different parts of the GPU: the
decode attention streams every row's KV (memory-bound), the matmuls are compute-bound at a few
hundred rows. Run one after the other, each leaves the other's resource idle. Split into two
halves A and B whose layer stacks run on two streams, with the attention kernels alternating
A, B, A, B, one half's attention streams KV while the other half runs its matmuls:

    stream A: pre(A, i); wait attn(B, i - 1); attend(A, i); record attn(A, i); post(A, i)
    stream B: pre(B, i); wait attn(A, i);     attend(B, i); record attn(B, i); post(B, i)

The halves are independent rows (each writes only its own KV slots, the weights are read
only), so the alternation events are the only edges between the streams; attention kernels
never overlap each other, so each still has the whole memory bandwidth. A runs on the caller's
stream, B on a side stream forked from it (the side stream waits on the caller's) and joined
back before the final norm. Eagerly this is plain two-stream work; under CUDA graph capture the
fork brings the side stream into the capture and the events become graph edges. On the CPU
there are no streams: the halves run in turn.

With ``attention_stream`` the attention kernels of both halves go to a third stream instead,
the caller's, in issue order (A, B, A, B: one stream alternates them), and each half's other
work to a side stream of higher priority:

    stream A (high): pre(A, i); record q(A, i); ...; wait attn(A, i); post(A, i)
    stream B (high): pre(B, i); record q(B, i); ...; wait attn(B, i); post(B, i)
    attention (low): wait q(A, i); attend(A, i); record; wait q(B, i); attend(B, i); record

The block scheduler hands SMs freed by a long attention kernel to the matmuls waiting on a
higher-priority stream first, so they need not wait for the attention's last wave.

Each half embeds its own rows on its own stream, so no tensor allocated on one stream is read
by the other before the join (the caching allocator could hand its memory to the first stream
again while the second still reads it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from greenroom.models.batch import ForwardBatch

ROW_ALIGN = 8  # half A's rows are a multiple of this where the batch allows


class LayerSteps(Protocol):
    """The pieces of a decoder layer stack the schedule calls (LlamaModel has them)."""

    @property
    def num_layers(self) -> int: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def pre(
        self,
        index: int,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        kv_pool: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(
        self, index: int, q: torch.Tensor, batch: ForwardBatch, kv_pool: torch.Tensor
    ) -> torch.Tensor: ...

    def post(
        self, index: int, attn: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Streams(Protocol):
    """Where each half's work goes and the events between them."""

    attention_stream: bool  # the attention kernels on a stream of their own (ATTENTION)

    def fork(self) -> None:
        """Start the side streams behind everything queued on the caller's."""

    def on(self, half: int) -> contextlib.AbstractContextManager[Any]:
        """Queue the work in this block on half ``half``'s stream, or on the attention
        stream (``ATTENTION``)."""

    def record(self) -> Any:
        """An event marking the work queued so far on the current half's stream."""

    def wait(self, event: Any) -> None:
        """Make later work on the current half's stream wait for ``event``."""

    def join(self) -> None:
        """Make the caller's stream wait for everything queued on the side streams."""


class HostStreams:
    """No streams (CPU): work runs as it is issued, in issue order."""

    def __init__(self, attention_stream: bool = False) -> None:
        self.attention_stream = attention_stream

    def fork(self) -> None:
        pass

    def on(self, half: int) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self) -> None:
        return None

    def wait(self, event: Any) -> None:
        pass

    def join(self) -> None:
        pass


ATTENTION = 2  # Streams.on: the attention stream (with ``attention_stream``)


class CudaStreams:
    """Two streams: half A on the stream current at ``fork``, half B on ``sides[0]``. With
    ``attention_stream``: A and B on ``sides``, the attention on the caller's stream."""

    def __init__(self, sides: tuple[torch.cuda.Stream, torch.cuda.Stream], attention_stream: bool):
        self.sides = sides
        self.attention_stream = attention_stream
        self.main: torch.cuda.Stream | None = None

    def _stream(self, role: int) -> torch.cuda.Stream:
        assert self.main is not None, "fork first"
        if self.attention_stream:
            return self.main if role == ATTENTION else self.sides[role]
        return self.main if role == 0 else self.sides[0]

    def _used_sides(self) -> tuple[torch.cuda.Stream, ...]:
        return self.sides if self.attention_stream else self.sides[:1]

    def fork(self) -> None:
        self.main = torch.cuda.current_stream(self.sides[0].device)
        for side in self._used_sides():
            side.wait_stream(self.main)

    @contextlib.contextmanager
    def on(self, role: int) -> Iterator[None]:
        with torch.cuda.stream(self._stream(role)):
            yield

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.sides[0].device).wait_event(event)

    def join(self) -> None:
        assert self.main is not None, "join without fork"
        for side in self._used_sides():
            self.main.wait_stream(side)


@dataclass
class NanoBatches:
    """Which decode batches split (``min_rows`` rows or more, decode-only), the schedule
    (``attention_stream``: see the module docstring), and the side streams per device."""

    min_rows: int
    attention_stream: bool = False
    _sides: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = field(
        default_factory=dict, repr=False
    )

    def splits(self, batch: ForwardBatch) -> bool:
        return (
            batch.decode_only
            and batch.helix is None
            and batch.num_requests >= max(self.min_rows, 2)
            and batch.num_tokens == batch.num_requests
        )

    def streams(self, device: torch.device) -> Streams:
        if device.type != "cuda":
            return HostStreams(self.attention_stream)
        if device not in self._sides:
            # the highest priority (priorities past the range clamp to it): above the
            # caller's stream, which runs the attention in the attention_stream schedule
            priority = -100 if self.attention_stream else 0
            self._sides[device] = (
                torch.cuda.Stream(device, priority=priority),
                torch.cuda.Stream(device, priority=priority),
            )
        return CudaStreams(self._sides[device], self.attention_stream)


def split_rows(rows: int) -> int:
    """Rows of half A: half the batch, rounded up to a multiple of ``ROW_ALIGN`` when that
    leaves half B a row (graph sizes are multiples of 16, so both halves keep aligned
    shapes)."""
    if rows < 2:
        raise ValueError(f"a batch of {rows} row(s) cannot split into two nano-batches")
    half = -(-rows // 2)
    aligned = -(-half // ROW_ALIGN) * ROW_ALIGN
    return aligned if aligned < rows else half


def split_decode_batch(batch: ForwardBatch, rows: int) -> tuple[ForwardBatch, ForwardBatch]:
    """The first ``rows`` rows of a decode-only batch and the rest, as views (no copies).

    A decode row is one token, so the per-token and the per-request arrays split at the same
    index. ``cu_seqlens_q`` and ``logits_indices`` of a decode batch count 0, 1, 2, ...: each
    half takes their head, which counts its own rows."""
    if not batch.decode_only or batch.num_tokens != batch.num_requests:
        raise ValueError("only decode-only batches (one token per request) split by rows")
    if not 0 < rows < batch.num_requests:
        raise ValueError(f"cannot split {batch.num_requests} rows at row {rows}")

    def half(lo: int, hi: int) -> ForwardBatch:
        n = hi - lo
        host = batch.host_lens
        return replace(
            batch,
            input_ids=batch.input_ids[lo:hi],
            positions=batch.positions[lo:hi],
            slot_mapping=batch.slot_mapping[lo:hi],
            block_tables=batch.block_tables[lo:hi],
            context_lens=batch.context_lens[lo:hi],
            cu_seqlens_q=batch.cu_seqlens_q[: n + 1],
            logits_indices=batch.logits_indices[:n],
            host_lens=(host[0][lo:hi], host[1][lo:hi]) if host is not None else None,
        )

    return half(0, rows), half(rows, batch.num_requests)


def run_nano_batches(
    model: LayerSteps, batch: ForwardBatch, kv_pool: torch.Tensor, streams: Streams
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer stack over ``batch`` as two nano-batches; returns the last layer's (hidden,
    residual) for every row, in batch order, on the caller's stream."""
    halves = split_decode_batch(batch, split_rows(batch.num_requests))
    state: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    done: list[Any] = [None, None]  # each half's last attention event
    # tensors read on a stream other than the one that allocated them, kept until the join:
    # freed earlier, their memory could go to new work on their own stream while still read
    crossing: list[torch.Tensor] = []
    streams.fork()
    for half, part in enumerate(halves):
        with streams.on(half):
            state.append((model.embed(part.input_ids), None))
    for index in range(model.num_layers):
        for half, part in enumerate(halves):
            h, residual = state[half]
            if streams.attention_stream:
                with streams.on(half):
                    q, residual = model.pre(index, h, residual, part, kv_pool)
                    ready = streams.record()
                with streams.on(ATTENTION):
                    streams.wait(ready)
                    attn = model.attend(index, q, part, kv_pool)
                    done[half] = streams.record()
                crossing += [q, attn]
                with streams.on(half):
                    streams.wait(done[half])
                    state[half] = model.post(index, attn, residual)
                continue
            with streams.on(half):
                q, residual = model.pre(index, h, residual, part, kv_pool)
                if done[1 - half] is not None:
                    streams.wait(done[1 - half])
                attn = model.attend(index, q, part, kv_pool)
                done[half] = streams.record()
                state[half] = model.post(index, attn, residual)
    streams.join()
    crossing.clear()
    (h_a, res_a), (h_b, res_b) = state
    if res_a is None or res_b is None:  # a model without layers
        raise ValueError("nano-batches need at least one layer")
    return torch.cat([h_a, h_b]), torch.cat([res_a, res_b])
