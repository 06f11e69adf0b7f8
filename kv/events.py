"""Block events (stored / removed / offloaded / onboarded) for a router to consume.

Events of one step are buffered and sent when the step ends, consecutive events of one kind
and tier merged into one `KVEvent`, so a request storing 32 blocks costs one message.
"""

from __future__ import annotations

from collections.abc import Callable

from greenroom.bus.messages import KVEvent

STORED = "stored"
REMOVED = "removed"
OFFLOADED = "offloaded"
ONBOARDED = "onboarded"

EventSink = Callable[[KVEvent], None]


class EventLog:
    """Buffers events when a sink is set; costs one branch per event otherwise."""

    __slots__ = ("sink", "_pending")

    def __init__(self, sink: EventSink | None) -> None:
        self.sink = sink
        self._pending: list[tuple[str, str, int]] = []

    def record(self, kind: str, tier: str, block_hash: int) -> None:
        if self.sink is not None:
            self._pending.append((kind, tier, block_hash))

    def flush(self) -> None:
        """Send what was recorded since the last flush, in order."""
        if not self._pending or self.sink is None:
            return
        pending, self._pending = self._pending, []
        run_kind, run_tier, hashes = pending[0][0], pending[0][1], []
        for kind, tier, h in pending:
            if (kind, tier) != (run_kind, run_tier):
                self.sink(KVEvent(kind=run_kind, block_hashes=hashes, tier=run_tier))
                run_kind, run_tier, hashes = kind, tier, []
            hashes.append(h)
        self.sink(KVEvent(kind=run_kind, block_hashes=hashes, tier=run_tier))
