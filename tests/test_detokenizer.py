"""Incremental detokenization joins up to the decoded whole, holding back split characters."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.actors.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token i is byte i: multi-byte UTF-8 characters span several tokens."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class SpacedTokenizer:
    """Words joined by spaces, as WordPiece-style decoders do: per-token decoding loses them."""

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def test_split_character_is_held_back_until_complete() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.push(list(b"ab")) == "ab"
    e_acute = list("é".encode())
    assert detok.push(e_acute[:1]) == ""
    assert detok.push(e_acute[1:]) == "é"
    assert detok.push(list(b"!")) == "!"


def test_separators_between_tokens_are_kept() -> None:
    detok = IncrementalDetokenizer(SpacedTokenizer())
    text = "".join(detok.push([t]) for t in (3, 14, 15, 92))
    assert text == "w3 w14 w15 w92"


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40), st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_deltas_concatenate_to_the_whole_text(text: str, chunk_sizes: list[int]) -> None:
    ids = list(text.encode())
    detok = IncrementalDetokenizer(ByteTokenizer())
    out, i, k = [], 0, 0
    while i < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        out.append(detok.push(ids[i : i + n]))
        i, k = i + n, k + 1
    assert "".join(out) == text
