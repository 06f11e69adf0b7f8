"""A plan's steps once its KVStep result is back: which drafted steps still hold, the first
chunks of new admissions, and the sampled input tokens pipelined stages need."""

from __future__ import annotations

from greenroom.actors.scheduling.budget import FlowBudget, IterationBudget
from greenroom.actors.scheduling.flight import Draft, PlanEntry
from greenroom.actors.scheduling.request import Request


def fill_plan(
    budget: FlowBudget, draft: Draft, newly: list[Request], failed: set[str]
) -> list[PlanEntry]:
    """The plan's steps: the draft's steps still valid, then first chunks of admissions."""
    take = IterationBudget(budget).take
    entries = []
    for r, epoch, n in draft.steps:
        if r.epoch != epoch or not r.live or r.flow != budget.name or r.request_id in failed:
            continue
        entries.append(PlanEntry(r, epoch, take(n), False))
    for r in newly:
        if not r.live or r.waiting_for_kv:
            continue  # preempted right away by this step's failed extends, or no KV yet
        n = take(r.prompt_left)
        if n > 0:
            entries.append(PlanEntry(r, r.epoch, n, False))
    return entries


def sampled_inputs(r: Request, num_tokens: int) -> list[int]:
    """Pipelined: the step's input tokens that were sampled (not in the prompt), which the
    stages that do not sample have never seen."""
    start = max(r.num_scheduled, len(r.prompt))
    end = r.num_scheduled + num_tokens
    if end <= start:
        return []
    return r.sequence()[start:end]
