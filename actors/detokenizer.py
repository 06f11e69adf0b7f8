"""Incremental detokenization: text deltas that join up to the decoded whole.

Decoding tokens one at a time loses what a tokenizer puts between them (spaces, merged bytes),
so each request keeps a short window: the text of the tokens already emitted is decoded again
with the new ones and only the difference goes out. A delta that would end inside a multi-byte
character (U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    __slots__ = ("_tokenizer", "_tokens", "_prefix", "_read")

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # tokens whose text has been emitted

    def push(self, token_ids: list[int]) -> str:
        """Add new tokens; return the text they add (possibly empty)."""
        self._tokens.extend(token_ids)
        decode = self._tokenizer.decode
        seen = decode(self._tokens[self._prefix : self._read]) if self._read > self._prefix else ""
        full = decode(self._tokens[self._prefix :])
        if len(full) <= len(seen) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return full[len(seen) :]
