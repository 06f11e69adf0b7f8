"""Trace requests: rows of a trace turned into prompts the server can run.

Prompts are synthetic token ids (the traces carry lengths, not text). Mooncake rows share
prefix blocks through their hash ids; CSV rows get private random prompts. Lengths are first
capped (`max_input_len`, `max_output_len`: optional limits for small CPU runs), then clipped to
the server's `max_model_len` (prompt cut so prompt + output fits; output cut too if it alone
does not fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from greenroom.replay.readers import TraceRow, read_rows
from greenroom.replay.tokens import BlockTokenCache, request_tokens


@dataclass(frozen=True, slots=True, eq=False)
class TraceRequest:
    """One request to replay: when to send it (seconds from the start), what to send."""

    arrival_s: float
    prompt_token_ids: np.ndarray  # int32 token ids
    max_tokens: int
    clipped: bool = False  # cut to fit max_model_len
    capped: bool = False  # cut by max_input_len / max_output_len
    index: int = 0  # row number in the trace
    trace_input_length: int = 0
    trace_output_length: int = 0

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_token_ids)


def fit_lengths(
    input_length: int,
    output_length: int,
    *,
    max_model_len: int | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> tuple[int, int, bool, bool]:
    """(prompt length, max tokens, clipped, capped) for a row; both lengths stay >= 1."""
    prompt = max(1, input_length)
    output = max(1, output_length)
    capped = False
    if max_input_len is not None and prompt > max_input_len:
        prompt, capped = max(1, max_input_len), True
    if max_output_len is not None and output > max_output_len:
        output, capped = max(1, max_output_len), True
    clipped = False
    if max_model_len is not None and prompt + output > max_model_len:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        clipped = True
        output = min(output, max_model_len - 1)
        prompt = min(prompt, max_model_len - output)
    return prompt, output, clipped, capped


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process at `rate` req/s; the first request arrives at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if n == 0:
        return np.zeros(0)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def build_requests(
    rows: list[TraceRow],
    *,
    vocab_size: int,
    max_model_len: int | None = None,
    seed: int = 0,
    rate: float | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> list[TraceRequest]:
    """Turn rows into requests sorted by arrival.

    Arrivals: Poisson at `rate` if given (replacing recorded times); otherwise the recorded
    times; rows without times (length-only traces) all arrive at 0.
    """
    if rate is not None:
        arrivals = poisson_arrivals(len(rows), rate, seed).tolist()
    else:
        arrivals = [0.0 if r.arrival_s is None else r.arrival_s for r in rows]
    blocks = BlockTokenCache(vocab_size, seed)
    out: list[TraceRequest] = []
    for index, (row, arrival) in enumerate(zip(rows, arrivals, strict=True)):
        prompt_len, max_tokens, clipped, capped = fit_lengths(
            row.input_length,
            row.output_length,
            max_model_len=max_model_len,
            max_input_len=max_input_len,
            max_output_len=max_output_len,
        )
        if row.hash_ids:
            tokens = blocks.prompt(row.hash_ids, prompt_len, index)
        else:
            tokens = request_tokens(index, prompt_len, vocab_size, seed)
        out.append(
            TraceRequest(
                arrival_s=float(arrival),
                prompt_token_ids=tokens,
                max_tokens=max_tokens,
                clipped=clipped,
                capped=capped,
                index=index,
                trace_input_length=row.input_length,
                trace_output_length=row.output_length,
            )
        )
    out.sort(key=lambda r: r.arrival_s)  # stable: equal times keep trace order
    return out


def load_trace(
    path: str | Path,
    fmt: str = "auto",
    *,
    vocab_size: int,
    max_model_len: int | None = None,
    seed: int = 0,
    max_requests: int | None = None,
    rate: float | None = None,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> list[TraceRequest]:
    """Read a trace file (mooncake, azure, lengths or auto) into requests to replay."""
    rows = read_rows(path, fmt, limit=max_requests)
    return build_requests(
        rows,
        vocab_size=vocab_size,
        max_model_len=max_model_len,
        seed=seed,
        rate=rate,
        max_input_len=max_input_len,
        max_output_len=max_output_len,
    )
