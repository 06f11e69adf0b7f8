"""KV transfer sessions: the state machine the KV manager owns on each side of a transfer.

    pending -> in_progress -> complete | error | cancelled | timed_out

Context side, a *lease*: the blocks of a prefilled request stay referenced after its first
token until the receiver acknowledges (any final state) or the lease runs out; both exits
release the blocks. Generation side, a *receive*: pending from the moment the node accepts the
request with its handle (``expect``), in_progress once admission gives it blocks and its read
goes to the engine (``receive``), settled by the engine's report or by the request ending
first (cancelled). A receive that ended is gone: a later report for it changes nothing, so
each receive is counted once. Every session has a deadline; none outlives it.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from greenroom.bus.messages import TransferHandle
from greenroom.kv.request_blocks import RequestBlocks


class TransferState(enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self not in (TransferState.PENDING, TransferState.IN_PROGRESS)


FINAL_STATES = frozenset(s.value for s in TransferState if s.terminal)
_NEXT = {
    TransferState.PENDING: {TransferState.IN_PROGRESS} | {s for s in TransferState if s.terminal},
    TransferState.IN_PROGRESS: {s for s in TransferState if s.terminal},
}


@dataclass
class Session:
    request_id: str
    state: TransferState
    deadline: float  # wall clock
    blocks: RequestBlocks | None = None  # context side: the leased blocks
    handle: TransferHandle | None = None

    def move(self, to: TransferState) -> None:
        if to not in _NEXT.get(self.state, ()):
            raise ValueError(f"transfer {self.request_id!r}: {self.state.value} -> {to.value}")
        self.state = to


class TransferSessions:
    """Open sessions by request id, one table per side, and counts of final states."""

    def __init__(self) -> None:
        self.leases: dict[str, Session] = {}
        self.receives: dict[str, Session] = {}
        self.finished: Counter[str] = Counter()

    # ------------------------------------------------------------------ context side

    def lease(self, blocks: RequestBlocks, handle: TransferHandle) -> None:
        rid = blocks.request_id
        if rid in self.leases:
            raise ValueError(f"request {rid!r} already has a lease")
        s = Session(rid, TransferState.PENDING, handle.lease_deadline, blocks, handle)
        s.move(TransferState.IN_PROGRESS)  # the handle is out: the receiver may read any time
        self.leases[rid] = s

    def end_lease(self, request_id: str, outcome: str) -> RequestBlocks | None:
        """Close a lease with the receiver's outcome; its blocks, or None if unknown."""
        s = self.leases.pop(request_id, None)
        if s is None:
            return None
        state = TransferState(outcome) if outcome in FINAL_STATES else TransferState.ERROR
        s.move(state)
        self.finished[f"lease_{state.value}"] += 1
        return s.blocks

    def expired_leases(self, now: float) -> list[RequestBlocks]:
        """Leases past their deadline, closed as timed_out; their blocks."""
        out = []
        for rid in [rid for rid, s in self.leases.items() if s.deadline <= now]:
            s = self.leases.pop(rid)
            s.move(TransferState.TIMED_OUT)
            self.finished["lease_timed_out"] += 1
            out.append(s.blocks)
        return out

    @property
    def leased_blocks(self) -> int:
        return sum(len(s.blocks.held_blocks()) for s in self.leases.values() if s.blocks)

    # ------------------------------------------------------------------ generation side

    def expect(self, request_id: str, handle: TransferHandle, deadline: float) -> Session:
        """The node accepted a request with a handle: its receive is pending until admitted."""
        if request_id in self.receives:
            raise ValueError(f"request {request_id!r} already has a receive")
        s = Session(request_id, TransferState.PENDING, deadline, handle=handle)
        self.receives[request_id] = s
        return s

    def receive(self, request_id: str, handle: TransferHandle, deadline: float) -> Session:
        """Admission: the pending receive (opened here if it was never expected) gets the
        read's deadline."""
        s = self.receives.get(request_id)
        if s is None:
            return self.expect(request_id, handle, deadline)
        if s.state is not TransferState.PENDING:
            raise ValueError(f"request {request_id!r} already has a read ({s.state.value})")
        s.handle, s.deadline = handle, deadline
        return s

    def started(self, request_id: str) -> None:
        s = self.receives.get(request_id)
        if s is not None and s.state is TransferState.PENDING:
            s.move(TransferState.IN_PROGRESS)

    def settle_receive(self, request_id: str, state: str) -> bool:
        """The engine's report; False for an unknown or already settled receive."""
        s = self.receives.pop(request_id, None)
        if s is None:
            return False
        s.move(TransferState(state) if state in FINAL_STATES else TransferState.ERROR)
        self.finished[f"receive_{s.state.value}"] += 1
        return True

    # ------------------------------------------------------------------ stats

    def counts(self) -> dict[str, int]:
        out = dict(self.finished)
        out["leases_open"] = len(self.leases)
        out["receives_open"] = len(self.receives)
        return out


__all__ = ["FINAL_STATES", "Session", "TransferSessions", "TransferState"]
