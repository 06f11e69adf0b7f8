"""Trace file readers: each turns a file into `TraceRow`s (arrival, lengths, prefix blocks).

Formats:
- mooncake: JSONL, one object per line: `timestamp` (ms), `input_length`, `output_length`,
  `hash_ids` (one id per 512-token prompt block; equal ids are equal blocks).
- azure: CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP wall clock
  `YYYY-MM-DD HH:MM:SS.fffffff`; arrival is the offset from the first row.
- lengths: CSV `input_length,output_length` with no times (arrivals are generated).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

FORMATS = ("mooncake", "azure", "lengths")

AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
LENGTHS_HEADER = ("input_length", "output_length")


class TraceFormatError(ValueError):
    """The trace file does not match its format."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One trace line: arrival in seconds (None: the trace has no times), token lengths."""

    arrival_s: float | None
    input_length: int
    output_length: int
    hash_ids: list[int] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """Guess the format from the first non-empty line of the file."""
    with open(path, encoding="utf-8", newline="") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    if first.startswith("{"):
        return "mooncake"
    header = tuple(c.strip() for c in first.split(","))
    if header[:3] == AZURE_HEADER:
        return "azure"
    if header[:2] == LENGTHS_HEADER:
        return "lengths"
    raise TraceFormatError(
        f"{path}: cannot tell the trace format from its first line {first[:80]!r}; "
        f"pass --format ({', '.join(FORMATS)})"
    )


def read_rows(path: str | Path, fmt: str, limit: int | None = None) -> list[TraceRow]:
    """Read at most `limit` rows of a trace in format `fmt` (or "auto")."""
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"mooncake": _mooncake, "azure": _azure, "lengths": _lengths}
    if fmt not in readers:
        raise ValueError(f"unknown trace format {fmt!r}; expected auto or one of {FORMATS}")
    return list(itertools.islice(readers[fmt](Path(path)), limit))


def _int_field(value: object, name: str, where: str) -> int:
    try:
        n = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise TraceFormatError(f"{where}: {name} is not an integer: {value!r}") from None
    if n < 0:
        raise TraceFormatError(f"{where}: {name} is negative: {n}")
    return n


def _mooncake(path: Path) -> Iterator[TraceRow]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{where}: not JSON: {e}") from None
            if not isinstance(obj, dict) or "input_length" not in obj:
                raise TraceFormatError(f"{where}: expected an object with input_length")
            hash_ids = obj.get("hash_ids", [])
            if not isinstance(hash_ids, list):
                raise TraceFormatError(f"{where}: hash_ids is not a list")
            yield TraceRow(
                arrival_s=float(obj.get("timestamp", 0)) / 1000.0,
                input_length=_int_field(obj["input_length"], "input_length", where),
                output_length=_int_field(obj.get("output_length"), "output_length", where),
                hash_ids=[_int_field(h, "hash id", where) for h in hash_ids],
            )


def parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch (UTC-naive) of `YYYY-MM-DD HH:MM:SS[.fffffff]`, keeping all
    fraction digits (datetime alone stops at microseconds)."""
    stamp, _, frac = text.strip().partition(".")
    base = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    if frac and not frac.isdigit():
        raise ValueError(f"bad fraction of a second in {text!r}")
    whole = (base - datetime(1970, 1, 1)).total_seconds()
    return whole + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _csv_rows(path: Path, header: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    # newline="" lets csv handle CRLF line ends and a missing final newline
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first is None or tuple(c.strip() for c in first[: len(header)]) != header:
            raise TraceFormatError(f"{path}: expected header {','.join(header)}, got {first}")
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                raise TraceFormatError(f"{where}: expected {len(header)} columns, got {row}")
            yield where, row


def _azure(path: Path) -> Iterator[TraceRow]:
    t0: float | None = None
    for where, row in _csv_rows(path, AZURE_HEADER):
        try:
            t = parse_azure_timestamp(row[0])
        except ValueError as e:
            raise TraceFormatError(f"{where}: bad TIMESTAMP {row[0]!r}: {e}") from None
        t0 = t if t0 is None else t0
        yield TraceRow(
            arrival_s=t - t0,
            input_length=_int_field(row[1], "ContextTokens", where),
            output_length=_int_field(row[2], "GeneratedTokens", where),
        )


def _lengths(path: Path) -> Iterator[TraceRow]:
    for where, row in _csv_rows(path, LENGTHS_HEADER):
        yield TraceRow(
            arrival_s=None,
            input_length=_int_field(row[0], "input_length", where),
            output_length=_int_field(row[1], "output_length", where),
        )
