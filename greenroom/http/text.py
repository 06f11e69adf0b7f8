"""Text in the HTTP server: the model's tokenizer, token strings and stop-string matching."""

from __future__ import annotations

from pathlib import Path

from greenroom.actors.detokenizer import IncrementalDetokenizer


class TextCodec:
    """The checkpoint's `tokenizer.json`, as the server needs it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}

    @classmethod
    def load(cls, model_dir: str | None) -> TextCodec | None:
        if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 20:
                self._token_text[token_id] = text
        return text

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)


class StopMatcher:
    """Finds the first stop string in streamed text; text that may begin one is held back.

    `push` returns the text that is safe to emit and whether a stop string was found (the stop
    string and everything after it are never emitted); `flush` returns what is held back once
    the output ends without a stop.
    """

    __slots__ = ("stops", "_longest", "_text", "_emitted")

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._text = ""
        self._emitted = 0

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        start = max(0, len(self._text) - self._longest + 1)
        self._text += piece
        found = -1
        for stop in self.stops:
            i = self._text.find(stop, start)
            if i != -1 and (found == -1 or i < found):
                found = i
        if found != -1:
            out = self._text[self._emitted : found]
            self._text = self._text[:found]
            self._emitted = found
            return out, True
        held = 0
        for k in range(min(self._longest - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                held = k
                break
        end = len(self._text) - held
        out = self._text[self._emitted : end]
        self._emitted = end
        return out, False

    def flush(self) -> str:
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out
