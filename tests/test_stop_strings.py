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
    """The text before the stop string that completes first in the whole text."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return (text[: min(found)[1]], True) if found else (text, False)


def test_the_stop_that_completes_first_wins() -> None:
    # ' aa' starts first, but 'a' completes first: a token-at-a-time stream stops there
    assert run(["a", " aa"], [" a", "a"]) == (" ", True)
    assert run(["a", " aa"], [" aa"]) == (" ", True)


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


def test_sample_text_cuts_at_the_stop_then_turns_the_final_delta_into_a_stop() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from greenroom.actors.detokenizer import SampleText
    from greenroom.bus.messages import RequestMetrics, TokenDelta

    vocab = {"[UNK]": 0, "ab": 1, "c": 2, "de": 3, "f": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    text = SampleText(tok, stop=["c de"])

    def delta(t: int, finish: str | None = None) -> TokenDelta:
        metrics = RequestMetrics(num_output_tokens=9) if finish else None
        return TokenDelta(request_id="r", token_ids=[t], finish_reason=finish, metrics=metrics)

    assert text.process(delta(1)).text == "ab"
    assert text.process(delta(2)).text == " "  # "c" may start the stop string: held
    hit = text.process(delta(3))
    assert (hit.text, hit.finish_reason, text.stopped) == ("", None, True)
    assert text.process(delta(4)) is None  # generated before the cancel arrived: dropped
    final = text.process(delta(4, "length"))
    assert (final.token_ids, final.text, final.finish_reason) == ([], "", "stop")
    assert final.metrics.num_output_tokens == 3

    plain = SampleText(tok, stop=["zz"])
    out = [plain.process(delta(t)).text for t in (1, 2)] + [plain.process(delta(3, "length")).text]
    assert "".join(out) == "ab c de"
