"""Records of work between messages: a KVStep awaiting its result, a plan awaiting its result.

Every request named in a draft or an issued plan holds one ``Request.holds`` count, so its
blocks are freed only after the last message that may touch them has come back.
"""

from __future__ import annotations

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


@dataclass(slots=True)
class PlanEntry:
    request: Request
    epoch: int
    num_tokens: int
    samples: bool


@dataclass(slots=True)
class IssuedPlan:
    """A StepPlan sent to an engine, awaiting its StepResult."""

    flow: str
    iteration: int
    entries: list[PlanEntry]
