"""Records of work between messages: a KVStep awaiting its result, a plan awaiting its result.

Every request named in a draft or an issued plan holds one ``Request.holds`` count, so its
blocks are freed only after the last message that may touch them has come back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from greenroom.actors.scheduling.request import Request
from greenroom.bus.messages import KVStep


@dataclass(slots=True)
class Draft:
    """A KVStep sent to the KV manager; the plan is finished when its result comes back."""

    flow: str
    step: KVStep
    # decodes and continuing prefill chunks: (request, epoch, num_tokens)
    steps: list[tuple[Request, int, int]] = field(default_factory=list)
    admits: list[Request] = field(default_factory=list)
    frees: list[Request] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return self.step.iteration

    def held(self) -> list[Request]:
        return [r for r, _, _ in self.steps] + self.admits

    def hold(self, delta: int) -> None:
        """Take (+1) or drop (-1) the draft's hold on the requests it steps or admits."""
        for r in self.held():
            r.holds += delta


@dataclass(slots=True)
class PlanEntry:
    request: Request
    epoch: int
    num_tokens: int
    samples: bool

    @property
    def current(self) -> bool:
        """Whether the request is still in the epoch the plan scheduled (not preempted since)."""
        return self.request.epoch == self.epoch


@dataclass(slots=True)
class IssuedPlan:
    """A StepPlan sent to an engine, awaiting its StepResult."""

    flow: str
    iteration: int
    entries: list[PlanEntry]

    def release(self) -> None:
        """Its result came back (or never will): the plan no longer holds its requests."""
        for e in self.entries:
            e.request.holds -= 1
            e.request.in_flight -= 1


def take_issued(queue: deque[IssuedPlan], iteration: int, pipelined: bool) -> IssuedPlan | None:
    """The issued plan a result answers: the oldest, or (pipelined) any in flight."""
    if queue and queue[0].iteration == iteration:
        return queue.popleft()
    if pipelined:
        for i, plan in enumerate(queue):
            if plan.iteration == iteration:
                del queue[i]
                return plan
    return None
