"""Trace readers: format detection, Mooncake JSONL, Azure CSV (CRLF, 7-digit fractions),
length-only CSV, and clear errors for malformed files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from greenroom.replay.bundled import AZURE_CONV, MOONCAKE, OPENORCA, bundled_trace
from greenroom.replay.readers import (
    TraceFormatError,
    detect_format,
    parse_azure_timestamp,
    read_rows,
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_azure_crlf_no_trailing_newline(tmp_path: Path) -> None:
    data = (
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        b"2023-11-16 18:15:46.6805900,374,44\r\n"
        b"2023-11-16 18:15:50.9951690,396,109\r\n"
        b"2023-11-16 18:16:46.6805901,12,3"
    )
    path = write(tmp_path, "t.csv", data)
    assert detect_format(path) == "azure"
    rows = read_rows(path, "auto")
    assert [(r.input_length, r.output_length) for r in rows] == [(374, 44), (396, 109), (12, 3)]
    assert rows[0].arrival_s == 0.0
    assert rows[1].arrival_s == pytest.approx(4.3145790, abs=1e-6)
    # crosses a minute boundary; the 7th fraction digit is kept (to float precision)
    assert rows[2].arrival_s == pytest.approx(60.0000001, abs=1e-6)
    assert all(r.hash_ids == [] for r in rows)


def test_azure_timestamp_parsing() -> None:
    a = parse_azure_timestamp("2023-11-16 23:59:59.9999999")
    b = parse_azure_timestamp("2023-11-17 00:00:00")
    assert b - a == pytest.approx(1e-7, abs=1e-6)
    with pytest.raises(ValueError):
        parse_azure_timestamp("2023-11-16T18:15:46.68")


def test_mooncake_rows(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 1024, "output_length": 1, "hash_ids": [0, 2]},
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(x) for x in lines).encode() + b"\n\n")
    assert detect_format(path) == "mooncake"
    rows = read_rows(path, "auto")
    assert [r.arrival_s for r in rows] == [0.0, 1.5]
    assert rows[1].hash_ids == [0, 2]
    assert rows[0].input_length == 700 and rows[1].output_length == 1


def test_lengths_rows_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "l.csv", b"input_length,output_length\n146,195\n122,366\n9,1\n")
    assert detect_format(path) == "lengths"
    rows = read_rows(path, "lengths", limit=2)
    assert [(r.arrival_s, r.input_length, r.output_length) for r in rows] == [
        (None, 146, 195),
        (None, 122, 366),
    ]


@pytest.mark.parametrize(
    "name,data,fmt,match",
    [
        (
            "a.csv",
            b"TIMESTAMP,ContextTokens,GeneratedTokens\r\nnot-a-time,1,2",
            "azure",
            "TIMESTAMP",
        ),
        ("b.csv", b"input_length,output_length\n12,x\n", "lengths", "output_length"),
        ("c.csv", b"input_length,output_length\n12,-3\n", "lengths", "negative"),
        ("d.csv", b"input_length,output_length\n12\n", "lengths", "columns"),
        (
            "e.jsonl",
            b'{"timestamp": 0, "input_length": 3, "output_length": 1}\n{oops\n',
            "mooncake",
            "not JSON",
        ),
        ("f.csv", b"a,b\n1,2\n", "lengths", "header"),
    ],
)
def test_malformed_traces_name_the_line(tmp_path: Path, name, data, fmt, match) -> None:
    path = write(tmp_path, name, data)
    with pytest.raises(TraceFormatError, match=match):
        read_rows(path, fmt)


def test_unknown_format(tmp_path: Path) -> None:
    path = write(tmp_path, "x.txt", b"hello,world\n")
    with pytest.raises(TraceFormatError, match="--format"):
        detect_format(path)
    with pytest.raises(ValueError, match="unknown trace format"):
        read_rows(path, "parquet")


def test_bundled_slice_is_the_head_of_the_azure_trace() -> None:
    data = resources.files("greenroom").joinpath("data/azure_conv_slice.csv").read_bytes()
    lines = data.split(b"\r\n")
    assert lines[0] == b"TIMESTAMP,ContextTokens,GeneratedTokens"
    assert len(lines) == 501 and not data.endswith(b"\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    rows = read_rows(bundled_trace(AZURE_CONV), "auto")
    assert len(rows) == 500
    assert rows[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(rows, rows[1:], strict=False))


@pytest.mark.parametrize(
    ("name", "fmt", "count"),
    [(AZURE_CONV, "azure", 500), (MOONCAKE, "mooncake", 290), (OPENORCA, "lengths", 1000)],
)
def test_bundled_slices_read_in_their_format(name: str, fmt: str, count: int) -> None:
    path = bundled_trace(name)
    assert detect_format(path) == fmt
    assert len(read_rows(path, "auto")) == count
    with pytest.raises(FileNotFoundError, match="bundled"):
        bundled_trace("nope.csv")
