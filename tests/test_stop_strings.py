"""Stop strings over streamed text: any split of the text into deltas gives the same result."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenroom.actors.stop_strings import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.push(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """The text before the first stop string anywhere in the whole text."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab c\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab c\n", min_size=1, max_size=5), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_any_split_matches_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(stops, pieces) == reference(stops, text)


def test_text_that_may_start_a_stop_is_held_back() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("x more") == ("</enx more", False)
    assert m.push("</e") == ("", False)
    assert m.push("nd> tail") == ("", True)


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher([""])
