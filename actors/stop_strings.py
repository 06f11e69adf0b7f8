"""Stop strings matched in streamed text, across token (and delta) boundaries.

Text that could be the start of a stop string is held back until the next text decides it:
either a stop string completes (the text before it goes out, the stop string and anything
after it never do) or it cannot any more (the held text goes out). So a client never sees
part of a stop string, and a match is found wherever the token boundaries fall.
"""

from __future__ import annotations


class StopMatcher:
    __slots__ = ("stops", "_held", "_max_hold")

    def __init__(self, stops: list[str]) -> None:
        if not stops or not all(stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self._held = ""
        self._max_hold = max(len(s) for s in stops) - 1

    def push(self, text: str) -> tuple[str, bool]:
        """(text that may go out now, whether a stop string completed)."""
        buf = self._held + text
        # the stop string that completes first wins (ties: the one that starts first), as
        # when the text arrives a token at a time, so the result never depends on the split
        found = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            self._held = ""
            return buf[: min(found)[1]], True
        keep = self._partial_stop(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The generation ended without a stop: the held text goes out."""
        held, self._held = self._held, ""
        return held

    def _partial_stop(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that begins some stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
