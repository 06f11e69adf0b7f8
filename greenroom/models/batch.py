"""The flat varlen batch a forward runs over: prefill, decode and mixed chunked prefill alike.

Each request contributes a chunk of new tokens that continues its cached prefix: token ``i``
of the chunk sits at position ``num_cached + i`` and is written to the slot its block table
gives that position. Attention for the request covers ``num_cached + len(chunk)`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from greenroom.models.helix_batch import HelixView


@dataclass(frozen=True)
class SequenceChunk:
    """One request's part of a batch."""

    token_ids: list[int]  # the new tokens computed this step
    num_cached: int  # tokens before them whose KV is already in the pool
    # block table covering at least num_cached + len(token_ids) tokens (a list or an array)
    block_ids: Sequence[int] | np.ndarray


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block * tokens_per_block + offset
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with the null block 0
    context_lens: torch.Tensor  # [B] int32: cached + new tokens
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    logits_indices: torch.Tensor  # [B] int64: each request's last token (or all [T])
    max_seqlen_q: int
    max_context_len: int
    decode_only: bool  # every request has exactly one new token
    all_logits: bool = False  # logits for every token instead of each request's last
    # prefill attention over a fixed tile list (CUDA graphs; greenroom.kernels.prefill_tiles)
    attention_tiles: torch.Tensor | None = None
    # (new tokens, context length) per request on the host, when built from chunks
    host_lens: tuple[np.ndarray, np.ndarray] | None = None
    # a Helix CP rank's local block tables, shard lengths and KV slots (greenroom.models.helix_batch)
    helix: HelixView | None = None
    # a mixed batch's leading requests with exactly one new token: their attention runs in the
    # decode kernel, which reads each KV head once for its whole query group (the prefill
    # kernel reads it once per query head)
    decode_rows: int = 0
    # the rows after them (block tables, cu_seqlens_q from 0, context lengths), each its own
    # aligned array
    chunk_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_requests(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(
        cls,
        chunks: list[SequenceChunk],
        tokens_per_block: int,
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> ForwardBatch:
        if not chunks:
            raise ValueError("a forward batch needs at least one sequence chunk")
        q_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        if (q_lens == 0).any():
            raise ValueError("every sequence chunk needs at least one new token")
        cached = np.fromiter((c.num_cached for c in chunks), dtype=np.int64, count=len(chunks))
        context_lens = cached + q_lens
        max_blocks = max(len(c.block_ids) for c in chunks)
        tables = np.zeros((len(chunks), max_blocks), dtype=np.int64)
        for row, c in enumerate(chunks):
            needed = -(-int(context_lens[row]) // tokens_per_block)
            if needed > len(c.block_ids):
                raise ValueError(
                    f"chunk {row} needs {needed} blocks for {int(context_lens[row])} tokens "
                    f"but its block table has {len(c.block_ids)}"
                )
            tables[row, : len(c.block_ids)] = c.block_ids
        cu = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        row_of_token = np.repeat(np.arange(len(chunks)), q_lens)
        positions = np.arange(int(cu[-1])) - cu[:-1][row_of_token] + cached[row_of_token]
        blocks = tables[row_of_token, positions // tokens_per_block]
        slots = blocks * tokens_per_block + positions % tokens_per_block
        input_ids = np.fromiter(
            (t for c in chunks for t in c.token_ids), dtype=np.int64, count=int(cu[-1])
        )
        logits_indices = np.arange(int(cu[-1])) if all_logits else cu[1:] - 1
        longer = np.flatnonzero(q_lens != 1)
        decode_rows = int(longer[0]) if longer.size else 0
        narrow_arrays = [tables, context_lens, cu]
        if decode_rows:
            d = decode_rows
            narrow_arrays += [tables[d:], cu[d:] - d, context_lens[d:]]
        wide, narrow = upload_packed(
            [input_ids, positions, slots, logits_indices], narrow_arrays, device
        )
        return cls(
            input_ids=wide[0],
            positions=wide[1],
            slot_mapping=wide[2],
            block_tables=narrow[0],
            context_lens=narrow[1],
            cu_seqlens_q=narrow[2],
            logits_indices=wide[3],
            max_seqlen_q=int(q_lens.max()),
            max_context_len=int(context_lens.max()),
            decode_only=bool((q_lens == 1).all()),
            all_logits=all_logits,
            host_lens=(q_lens, context_lens),
            decode_rows=decode_rows,
            chunk_rows=tuple(narrow[3:]) if decode_rows else None,
        )


ALIGN_WORDS = 4  # every array starts on a 16-byte boundary of the packed buffer


def _aligned(words: int) -> int:
    return -(-words // ALIGN_WORDS) * ALIGN_WORDS


def upload_packed(
    wide: list[np.ndarray], narrow: list[np.ndarray], device: torch.device | str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``wide`` arrays as int64 and ``narrow`` ones as int32 tensors on ``device``, in one
    host-to-device copy from pinned memory: the copy is asynchronous, so the host can run
    ahead of a forward still on the GPU (a pageable copy would wait for it).

    Each array starts 16-byte aligned: Triton specializes a kernel on its pointer arguments'
    alignment, so arrays at arbitrary offsets would compile new kernel variants mid-serving."""
    device = torch.device(device)
    offsets, total = [], 0
    for a, words_per in [(a, 2) for a in wide] + [(a, 1) for a in narrow]:
        offsets.append(total)
        total = _aligned(total + a.size * words_per)
    host = torch.empty(max(total, ALIGN_WORDS), dtype=torch.int32, pin_memory=device.type == "cuda")
    words = host.numpy()
    for i, a in enumerate(wide):
        words[offsets[i] : offsets[i] + 2 * a.size].view(np.int64)[:] = a.ravel()
    for i, a in enumerate(narrow, start=len(wide)):
        words[offsets[i] : offsets[i] + a.size] = a.ravel()
    dev = host.to(device, non_blocking=True) if device.type != "cpu" else host
    out_wide = [
        dev[offsets[i] : offsets[i] + 2 * a.size].view(torch.int64).view(a.shape)
        for i, a in enumerate(wide)
    ]
    out_narrow = [
        dev[offsets[i] : offsets[i] + a.size].view(a.shape)
        for i, a in enumerate(narrow, start=len(wide))
    ]
    return out_wide, out_narrow
