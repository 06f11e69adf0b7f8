"""What the next KVStep of a flow asks for, read from the core's queues: the room for
admissions (the active cap, a rejected head alone) and, under adaptive routing, which
waiting prompts are this flow's."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from greenroom.actors.scheduling.admission_routing import routed_admissions
from greenroom.actors.scheduling.budget import FlowBudget
from greenroom.actors.scheduling.flight import Draft
from greenroom.actors.scheduling.head_rejection import HeadRejection
from greenroom.actors.scheduling.planner import Selection, select_work, steps_now
from greenroom.actors.scheduling.request import Request
from greenroom.actors.scheduling.routing import PromptRouting


class FlowSelector:
    """Selects over the core's own queues (shared, not copied)."""

    __slots__ = (
        "_drafts",
        "_flows",
        "_head",
        "_max_active",
        "_pipelined",
        "_routing",
        "_running",
        "_waiting",
    )

    def __init__(
        self,
        flows: dict[str, FlowBudget],
        max_active: int,
        pipelined: bool,
        routing: PromptRouting | None,
        queues: tuple[OrderedDict[str, Request], dict[str, Request], dict[str, Draft]],
        head: HeadRejection,
    ) -> None:
        """``queues``: the core's waiting queue, running requests and drafts by flow."""
        self._flows, self._max_active = flows, max_active
        self._pipelined, self._routing, self._head = pipelined, routing, head
        self._waiting, self._running, self._drafts = queues

    def has_work(self, flow: str, num_active: int) -> bool:
        """Whether ``select`` would pick anything: a running request's step answers at once
        (the scheduler asks after every result of either flow, so this stays cheap); only
        admissions need the full selection (and, under adaptive routing, the routing)."""
        fb = self._flows[flow]
        if any(steps_now(fb, r) for r in self._steppable()):
            return True
        if not fb.admits or not self._waiting:
            return False
        return bool(self.select(flow, num_active).admits)

    def _steppable(self) -> Iterable[Request]:
        """The running requests a plan may step: pipelined, not one in a micro-batch in flight
        (it waits for that result)."""
        running = self._running.values()
        if not self._pipelined:
            return running
        return (r for r in running if r.in_flight == 0)

    def select(self, flow: str, num_active: int) -> Selection:
        fb = self._flows[flow]
        room = 0
        if fb.admits:
            # both flows admit under adaptive routing: the other's pending admissions count
            pending = sum(len(d.admits) for f, d in self._drafts.items() if f != flow)
            room = self._max_active - num_active - pending
        room = self._head.admit_room(self._waiting, room)
        running = self._steppable()
        waiting = self._waiting.values()
        if self._routing is not None:
            waiting = routed_admissions(
                flow,
                waiting,
                {r.request_id for d in self._drafts.values() for r in d.admits},
                room,
                self._routing,
                self._flows,
                self._running.values(),
            )
        return select_work(fb, running, waiting, room)
