"""KV-transfer receives on a generation node: a request that arrives with a context node's
KV handle reads its prompt's KV into its blocks before it decodes.

A receive is pending from submission, its read starts once the request is admitted (in the
next plan), and it settles when the engine reports the read. The KV manager's sessions hear
every receive opened and settled, in order; the context node hears how each ended.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from greenroom.actors.scheduling.outputs import OutputCollector
from greenroom.actors.scheduling.request import KVWait, Request
from greenroom.bus.messages import KVReceive, TransferDone, TransferHandle, TransferUpdate


class KVReceives:
    """The generation role's receives: reads on the engine, reads to abandon, and updates
    for the KV manager. ``settle`` and ``fail`` are the core's, for a request a read let go;
    ``ended`` collects the context node's notices of receives closed before their read."""

    __slots__ = ("_cancels", "_counters", "_ended", "_fail", "_reading", "_settle", "_updates")

    def __init__(
        self,
        settle: Callable[[Request], None],
        fail: Callable[[Request, OutputCollector, str], None],
        counters: Counter[str],
        ended: list[TransferDone],
    ) -> None:
        self._settle = settle
        self._fail = fail
        self._counters = counters
        self._reading: dict[str, Request] = {}  # reads on the engine
        self._cancels: list[str] = []  # reads the next plan abandons
        self._updates: list[TransferUpdate] = []  # for the KV manager's sessions
        self._ended = ended  # receives closed unread, for the next output batch

    @property
    def num_reading(self) -> int:
        return len(self._reading)

    def has_work(self) -> bool:
        """Reads to poll or to cancel, or receives to open or settle in the KV manager."""
        return bool(self._reading or self._cancels or self._updates)

    def pending(self, request_id: str, handle: TransferHandle) -> None:
        """A request with a KV handle was submitted: its receive is pending from now on."""
        self._updates.append(TransferUpdate(request_id, "pending", handle=handle))

    def take_updates(self) -> list[TransferUpdate]:
        updates, self._updates = self._updates, []
        return updates

    def take_cancels(self) -> list[str]:
        cancels, self._cancels = self._cancels, []
        return cancels

    def start(self, rc: KVReceive, requests: dict[str, Request]) -> bool:
        """An admitted receiver's read goes into the plan; False if it ended meanwhile."""
        r = requests.get(rc.request_id)
        if r is None or r.kv_wait is not KVWait.READ:
            # ended while the KVStep was out: no read starts; ``request_ended`` closed it
            return False
        self._reading[r.request_id] = r
        return True

    def request_ended(self, r: Request) -> None:
        """``r`` ended: abandon its read, or close a receive whose read never started."""
        if r.kv_wait is KVWait.READ:  # keep the blocks until the engine drops the read
            r.kv_wait = KVWait.CANCEL
            self._cancels.append(r.request_id)
        elif r.kv_wait is KVWait.ADMIT:  # never read: the context node can free its lease
            r.kv_wait = KVWait.NONE
            self._ended.append(TransferDone(r.request_id, "cancelled", "request ended"))
            # the KV manager's pending receive ends here too (after the admission if a KVStep
            # admitting the request is out: that KVStep's read never starts)
            self._updates.append(
                TransferUpdate(r.request_id, "cancelled", "request ended before its read")
            )

    def settled(self, u: TransferUpdate, out: OutputCollector) -> None:
        """The engine's report on a read: decode, fail, or free what a cancel kept."""
        self._updates.append(u)
        r = self._reading.pop(u.request_id, None)
        if r is None:
            return
        out.transfers.append(TransferDone(u.request_id, u.state, u.message))
        if r.kv_wait is KVWait.CANCEL:
            r.kv_wait = KVWait.NONE
            self._settle(r)
        elif u.state == "complete" and r.live:
            r.kv_received()
            self._counters["kv_received"] += 1
        else:
            r.kv_wait = KVWait.NONE
            self._counters[f"kv_{u.state}"] += 1
            if r.live:
                detail = f": {u.message}" if u.message else ""
                self._fail(r, out, f"KV transfer {u.state}{detail}")
            self._settle(r)

    def drop(self, out: OutputCollector, message: str) -> None:
        """The engine (and its NIXL agent) is gone: its reads ended with it."""
        for rid, r in list(self._reading.items()):
            del self._reading[rid]
            r.kv_wait = KVWait.NONE
            self._updates.append(TransferUpdate(rid, "error", message))
            out.transfers.append(TransferDone(rid, "error", message))
            self._settle(r)
        self._cancels = []
