"""The queue head the KV manager turned down: it is retried alone, and failed when it was
asked alone while no request held a block (nothing will ever make room for it)."""

from __future__ import annotations

from collections.abc import Iterable

from greenroom.actors.scheduling.request import Request
from greenroom.bus.messages import KVStepResult


def pool_was_empty(result: KVStepResult, num_active: int) -> bool:
    """Whether no request held a block when the KV manager ran this step. Judged from the
    KV manager's own counts, not from the core's view: with two flows (or several plans
    in flight) a free or an admission may be applied there before or after the KVStep that
    rejected a request, while the KV manager ran them in the order they were sent."""
    if not result.total_blocks:
        return num_active == 0
    return result.free_blocks >= result.total_blocks


class HeadRejection:
    __slots__ = ("request_id",)

    def __init__(self) -> None:
        self.request_id: str | None = None  # the queue head the KV manager last turned down

    def admit_room(self, waiting: Iterable[str], room: int) -> int:
        """A rejected head is asked for alone, so that later candidates' prefix claims
        cannot crowd it out again."""
        if self.request_id is not None and next(iter(waiting), None) == self.request_id:
            return min(room, 1)
        return room

    def judge(self, admits: list[Request], result: KVStepResult, num_active: int) -> Request | None:
        """Read a KVStep result for its admissions: the head that can never fit, if any."""
        head = admits[0] if admits else None
        if head is None or head.request_id not in result.rejected:
            self.request_id = None
        elif len(admits) > 1 or head.state.terminal or not pool_was_empty(result, num_active):
            self.request_id = head.request_id  # retry it alone
        else:
            self.request_id = None
            return head
        return None
