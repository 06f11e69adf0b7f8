"""A plan's steps once its KVStep result is back: which drafted steps still hold, the first
chunks of new admissions, and the sampled input tokens pipelined stages need."""

from __future__ import annotations

from collections import Counter

from greenroom.actors.scheduling.budget import FlowBudget, IterationBudget
from greenroom.actors.scheduling.flight import Draft, PlanEntry
from greenroom.actors.scheduling.request import Request
from greenroom.bus.messages import NewSequence, SequenceStep


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


def sequence_step(
    r: Request, flow: str, num_tokens: int, new_blocks: list[int], pipelined: bool
) -> tuple[SequenceStep, NewSequence | None]:
    """``r``'s step in a plan of ``flow``; the first plan of ``flow`` to name ``r`` also
    carries its whole sequence (every block, this iteration's too)."""
    if flow in r.known_by:
        inputs = sampled_inputs(r, num_tokens) if pipelined else []
        return SequenceStep(r.request_id, num_tokens, new_blocks, inputs), None
    r.known_by.add(flow)
    return SequenceStep(r.request_id, num_tokens), r.new_sequence()


def count_plan(budget: FlowBudget, steps: list[SequenceStep], counters: Counter[str]) -> None:
    """Record the plan's size; a plan beyond its flow's budget is a scheduler bug."""
    num_tokens = sum(s.num_tokens for s in steps)
    counters["max_plan_tokens"] = max(counters["max_plan_tokens"], num_tokens)
    counters["plans_over_budget"] += num_tokens > budget.max_num_tokens
    counters["plans"] += 1
    assert num_tokens <= budget.max_num_tokens, (num_tokens, budget)
    assert len(steps) <= budget.max_batch_size, (len(steps), budget)
