"""Isolating a failed step: the requests whose data broke it fail alone, the others run.

Validation at the frontend keeps what the engine cannot represent out of plans; this is the
defence behind it. When a plan raises, the executor's per-sequence state is put back as it was,
the plan-level part (forgetting finished sequences, block copies) runs alone, then the steps run
again in halves, bisecting down to the requests that fail on their own. A failure that every
request of a plan shares is not one request's fault: it is raised, and the engine crashes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from greenroom.bus.messages import SequenceStep, StepPlan, StepResult


@dataclass
class _Saved:
    num_computed: int
    num_blocks: int
    num_tokens: int
    num_output_tokens: int


class StepIsolation:
    """Runs plans on ``execute`` over the executor's ``sequences`` (request id -> Sequence)."""

    def __init__(
        self,
        execute: Callable[[StepPlan], StepResult],
        sequences: dict,
        forget: Callable[[str], None] | None = None,
    ) -> None:
        """``forget``: the executor's way to drop a sequence (releasing what it holds)."""
        self.execute = execute
        self.sequences = sequences
        self.forget = forget or (lambda rid: self.sequences.pop(rid, None))
        self.isolated_steps = 0  # plans that failed and were split (for tests and stats)
        self.failed_ids: set[str] = set()  # failed here; plans built meanwhile still step them

    def strip(self, plan: StepPlan) -> tuple[StepPlan, dict[str, str]]:
        """``plan`` without the requests this engine already failed (plans issued before the
        scheduler heard of it still name them), and those requests."""
        self.failed_ids.difference_update(plan.finished)
        gone = {s.request_id for s in plan.steps if s.request_id in self.failed_ids}
        if not gone:
            return plan, {}
        return msgspec.structs.replace(
            plan,
            new=[n for n in plan.new if n.request_id not in gone],
            steps=[s for s in plan.steps if s.request_id not in gone],
        ), dict.fromkeys(gone, "this request failed in an earlier step")

    def run(self, plan: StepPlan) -> StepResult:
        saved = self.save(plan)
        try:
            return self.execute(plan)
        except Exception as exc:
            return self.recover(plan, saved, exc)

    def save(self, plan: StepPlan) -> dict:
        """What ``plan`` may change in the executor's sequences (before running it)."""
        return self._save(plan)

    def recover(self, plan: StepPlan, saved: dict, error: Exception) -> StepResult:
        """``plan`` raised ``error``: put the sequences back and run it request by request."""
        if not plan.steps:
            raise error
        self._restore(plan, saved)
        return self._isolate(plan, error)

    def _isolate(self, plan: StepPlan, error: Exception) -> StepResult:
        self.isolated_steps += 1
        stepped = {s.request_id for s in plan.steps}
        self.execute(  # raises if the plan-level part fails: nobody's fault but the engine's
            StepPlan(
                iteration=plan.iteration,
                new=[n for n in plan.new if n.request_id not in stepped],
                finished=plan.finished,
                copies=plan.copies,
                flow=plan.flow,
            )
        )
        sampled: list = []
        failed: dict[str, str] = {}
        duration = 0.0
        pending = [plan.steps[: len(plan.steps) // 2], plan.steps[len(plan.steps) // 2 :]]
        if len(plan.steps) == 1:
            pending = [plan.steps]
        while pending:
            part = pending.pop()
            if not part:
                continue
            sub = self._sub_plan(plan, part)
            saved = self._save(sub)
            try:
                result = self.execute(sub)
            except Exception as exc:
                self._restore(sub, saved)
                if len(part) == 1:
                    failed[part[0].request_id] = f"this request's step failed: {exc}"
                else:
                    mid = len(part) // 2
                    pending += [part[:mid], part[mid:]]
                continue
            sampled.extend(result.sampled)
            duration += result.duration_s
        if len(failed) == len(plan.steps) > 1:
            raise error  # every request fails: the engine, not a request, is broken
        self.failed_ids.update(failed)
        return StepResult(
            iteration=plan.iteration,
            sampled=sampled,
            flow=plan.flow,
            duration_s=duration,
            failed=failed,
        )

    @staticmethod
    def _sub_plan(plan: StepPlan, part: list[SequenceStep]) -> StepPlan:
        ids = {s.request_id for s in part}
        return StepPlan(
            iteration=plan.iteration,
            new=[n for n in plan.new if n.request_id in ids],
            steps=part,
            flow=plan.flow,
        )

    def _save(self, plan: StepPlan) -> dict[str, _Saved | None]:
        saved: dict[str, _Saved | None] = {}
        for s in plan.steps:
            seq = self.sequences.get(s.request_id)
            saved[s.request_id] = (
                None
                if seq is None
                else _Saved(
                    seq.num_computed, len(seq.block_ids), len(seq.tokens), seq.num_output_tokens
                )
            )
        for n in plan.new:
            saved.setdefault(n.request_id, None)
            if n.request_id not in {s.request_id for s in plan.steps}:
                saved[n.request_id] = None
        return saved

    def _restore(self, plan: StepPlan, saved: dict[str, _Saved | None]) -> None:
        for rid, state in saved.items():
            if state is None:
                self.forget(rid)  # registered by this plan: registered again
                continue
            seq = self.sequences.get(rid)
            if seq is None:
                continue
            seq.num_computed = state.num_computed
            del seq.block_ids[state.num_blocks :]
            del seq.tokens[state.num_tokens :]
            seq.num_output_tokens = state.num_output_tokens


__all__ = ["StepIsolation"]
