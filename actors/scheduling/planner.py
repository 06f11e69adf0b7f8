"""What one iteration of a flow asks for: decodes, prefill chunks, extends and admissions.

Pure selection over the request state; nothing here changes a request. Order, under the
flow's token and sequence budget: running decodes (one token each, admission order), then
chunks of admitted prompts (continuing chunked prefills first, FCFS), then admission
candidates from the waiting queue, each counted at its uncached worst case.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from greenroom.actors.scheduling.budget import FlowBudget, IterationBudget
from greenroom.actors.scheduling.request import Request, RequestState
from greenroom.bus.messages import KVAdmit, KVExtend


@dataclass(slots=True)
class Selection:
    steps: list[tuple[Request, int]] = field(default_factory=list)  # (request, num_tokens)
    admits: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps or self.admits)


def steps_now(flow: FlowBudget, r: Request) -> bool:
    """Whether running request ``r`` has a step in ``flow``'s next plan: a decode, or a chunk
    of its prompt (not while its KV is still being received)."""
    if r.flow != flow.name:
        return False
    if flow.decodes and r.can_decode():
        return True
    return flow.prefills and chunk_ready(r)


def chunk_ready(r: Request) -> bool:
    """An admitted prompt with tokens left to prefill and its KV not still being received."""
    return r.state is RequestState.PREFILL and r.prompt_left > 0 and not r.waiting_for_kv


def select_work(
    flow: FlowBudget,
    running: Iterable[Request],
    waiting: Iterable[Request],
    admit_room: int,
) -> Selection:
    """Fill one iteration of ``flow``; ``admit_room`` bounds new admissions (active cap)."""
    budget = IterationBudget(flow)
    sel = Selection()
    mine = [r for r in running if r.flow == flow.name]
    if flow.decodes:
        for r in mine:
            if budget.exhausted:
                break
            if r.can_decode():
                sel.steps.append((r, budget.take(1)))
    if flow.prefills:
        for r in mine:
            if budget.exhausted:
                break
            if chunk_ready(r):
                sel.steps.append((r, budget.take(r.prompt_left)))
    if flow.admits:
        for r in waiting:
            if admit_room <= 0 or budget.exhausted:
                break
            if r.has_blocks:
                break  # preempted and its old blocks are not freed yet: keep FCFS order
            budget.take(len(r.prompt))
            sel.admits.append(r)
            admit_room -= 1
    return sel


def extend_for(r: Request, num_tokens: int, tokens_per_block: int) -> KVExtend | None:
    """The extend a step of ``num_tokens`` needs, or None when the request's blocks suffice."""
    need = r.num_scheduled + num_tokens
    if need > len(r.block_ids) * tokens_per_block:
        return KVExtend(r.request_id, need)
    return None


def admit_for(r: Request, capacity_policy: str) -> KVAdmit:
    """Admission ask: ``guaranteed_no_evict`` reserves the worst case, else the prompt only."""
    reserve = len(r.prompt)
    if capacity_policy == "guaranteed_no_evict":
        reserve += r.max_output - len(r.output)
    return KVAdmit(
        request_id=r.request_id,
        token_ids=list(r.prompt),
        reserve_tokens=reserve,
        priority=r.priority,
        cache_salt=r.cache_salt,
        receive=r.kv_handle,
    )
