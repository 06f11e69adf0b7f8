"""Adaptive routing inside the scheduler: which waiting requests each SM-disaggregation flow
may admit, given the room each flow's next plan leaves after its running requests."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping

from greenroom.actors.scheduling.budget import FlowBudget
from greenroom.actors.scheduling.planner import chunk_ready
from greenroom.actors.scheduling.request import Request
from greenroom.actors.scheduling.routing import FlowRoom, PromptRouting, Waiting, route_prompts


def routed_flows(
    flows: dict[str, FlowBudget], routing: PromptRouting | None
) -> tuple[dict[str, FlowBudget], PromptRouting | None]:
    """The flows and the routing a core runs: under ``adaptive`` (two flows only) each
    admission goes to the flow ``route_prompts`` picks, so the generation flow takes prompts."""
    if routing is None or not routing.adaptive:
        return flows, None
    if "generation" not in flows:
        raise ValueError("adaptive prompt routing needs the context and generation flows")
    gen = dataclasses.replace(flows["generation"], takes_prompts=True)
    return {**flows, "generation": gen}, routing


def flow_room(budget: FlowBudget, running: Iterable[Request]) -> FlowRoom:
    """What the next plan of ``budget``'s flow leaves for new prompts after its running
    requests (decodes and continuing chunks)."""
    tokens, seqs = budget.max_num_tokens, budget.max_batch_size
    for r in running:
        if r.flow != budget.name:
            continue
        if budget.decodes and r.can_decode():
            tokens, seqs = tokens - 1, seqs - 1
        elif chunk_ready(r):
            tokens, seqs = tokens - r.prompt_left, seqs - 1
    # every request the plan carries took one sequence slot
    return FlowRoom(max(0, tokens), max(0, seqs), budget.max_batch_size - seqs)


def routed_admissions(
    flow: str,
    waiting: Iterable[Request],
    admitting: set[str],
    room: int,
    routing: PromptRouting,
    flows: Mapping[str, FlowBudget],
    running: Collection[Request],
) -> list[Request]:
    """The admission candidates ``route_prompts`` sends to ``flow``: at most ``room`` from the
    head of ``waiting``, skipping those the other flow's KVStep is ``admitting``; each flow's
    room is what its next plan leaves after the ``running`` requests (``flow_room``), counted
    only when there is a candidate to route."""
    candidates: list[Request] = []
    for r in waiting:
        if len(candidates) >= room:
            break
        if r.request_id in admitting:
            continue
        candidates.append(r)
        if r.has_blocks:
            break  # select_work keeps FCFS behind a preempted request not yet freed
    if not candidates:
        return []
    routed = route_prompts(
        "adaptive",
        [Waiting(r.request_id, len(r.prompt)) for r in candidates],
        routing.threshold_tokens,
        flow_room(flows["context"], running),
        flow_room(flows["generation"], running),
        ride_when_idle=routing.ride_when_idle,
    )
    mine = set(routed.context if flow == "context" else routed.generation)
    return [r for r in candidates if r.request_id in mine]
