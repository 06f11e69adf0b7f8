"""Incremental detokenization: text deltas that join up to the decoded whole.

Decoding tokens one at a time loses what a tokenizer puts between them (spaces, merged bytes),
so each request keeps a short window: the text of the tokens already emitted is decoded again
with the new ones and only the difference goes out. A delta that would end inside a multi-byte
character (U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from greenroom.actors.stop_strings import StopMatcher
from greenroom.bus.messages import TokenDelta


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


class SampleText:
    """One sample's text stream at the frontend: detokenization and stop strings.

    After a stop string matched, the request is being cancelled: later deltas are dropped,
    and the final one becomes a ``stop`` finish that carries no tokens and counts, in its
    metrics, only the tokens the client received.
    """

    __slots__ = ("_detok", "_matcher", "_min_tokens", "num_tokens", "stopped")

    def __init__(self, tokenizer: Any, stop: list[str], min_tokens: int = 0) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._matcher = StopMatcher(stop) if stop else None
        self._min_tokens = min_tokens  # stop strings match in the text after this many tokens
        self.num_tokens = 0
        self.stopped = False

    def process(self, delta: TokenDelta) -> TokenDelta | None:
        """The delta to forward (with its text), or None to drop it."""
        if self.stopped:
            if delta.finish_reason is None:
                return None
            return self._stop_final(delta, [], "")
        self.num_tokens += len(delta.token_ids)
        text = self._detok.push(list(delta.token_ids)) if delta.token_ids else ""
        if self._matcher is not None and self.num_tokens > self._min_tokens:
            text, hit = self._matcher.push(text)
            if hit:
                self.stopped = True
                if delta.finish_reason is not None:
                    return self._stop_final(delta, delta.token_ids, text)
                return msgspec.structs.replace(delta, text=text)
        if delta.finish_reason is not None and self._matcher is not None:
            text += self._matcher.flush()
        return msgspec.structs.replace(delta, text=text)

    def _stop_final(self, delta: TokenDelta, token_ids: list[int], text: str) -> TokenDelta:
        metrics = delta.metrics
        if metrics is not None:
            metrics = msgspec.structs.replace(metrics, num_output_tokens=self.num_tokens)
        return msgspec.structs.replace(
            delta,
            token_ids=token_ids,
            logprobs=delta.logprobs if token_ids else None,
            text=text,
            finish_reason="stop",
            metrics=metrics,
        )
