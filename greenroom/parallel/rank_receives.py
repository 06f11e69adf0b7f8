"""KV receives on a Helix generation node: each CP rank reads its own blocks through NIXL.

The KV manager places a received request's blocks as it places any: block ``j`` on CP rank
``j mod cp_size`` (global id = rank * blocks_per_rank + local id). Every rank gets the same plan
with the whole ``KVReceive``; each registers its own pool with its own NIXL agent, keeps the
(remote, local) block pairs whose local block is its own, and posts one read for them into its
pool (a rank holding none of the request's blocks settles at once). A receive is settled for
the node only when every rank's share settled: after each step the ranks all-gather the state
of every open receive (a few integers over the CP group, through torch.distributed), and the
answering rank reports the merged state with its result. Every rank opens receives in plan
order and merges by the same gathered states, so the ranks agree on which receives are open.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from greenroom.bus.messages import KVReceive, StepPlan, StepResult, TransferUpdate
from greenroom.kv.transfer import KVTransferAgent
from greenroom.models.helix_batch import HelixRank
from greenroom.parallel.comm import TensorParallel

IDLE_READ_WAIT_S = 0.002
# gathered codes: 0 while a rank's share is still reading
_CODES = {"complete": 1, "error": 2, "timed_out": 3, "cancelled": 4}
_STATES = {code: state for state, code in _CODES.items()}
_WORST_FIRST = ("error", "timed_out", "cancelled")


def rank_share(recv: KVReceive, helix: HelixRank) -> KVReceive:
    """The part of ``recv`` whose local blocks are ``helix``'s, as ids into its own pool."""
    first, end = helix.first_block, helix.first_block + helix.blocks_per_rank
    pairs = [
        (remote, local - first)
        for remote, local in zip(recv.remote_blocks, recv.local_blocks, strict=True)
        if first <= local < end
    ]
    return msgspec.structs.replace(
        recv, remote_blocks=[r for r, _ in pairs], local_blocks=[loc for _, loc in pairs]
    )


def merge_states(request_id: str, codes: Iterable[int], local: TransferUpdate) -> TransferUpdate:
    """One update for a receive every rank settled: complete only if every share completed."""
    states = [_STATES[c] for c in codes]
    if all(s == "complete" for s in states):
        return TransferUpdate(request_id, "complete")
    worst = next(s for s in _WORST_FIRST if s in states)
    rank = states.index(worst)
    detail = local.message if local.state == worst and local.message else f"on CP rank {rank}"
    return TransferUpdate(request_id, worst, detail)


class RankReceives:
    """One CP rank's NIXL agent over its pool, and the receives the ranks have not all settled."""

    def __init__(
        self, agent: KVTransferAgent, helix: HelixRank, group: TensorParallel, device, mode: str
    ) -> None:
        self.agent, self.helix, self.group = agent, helix, group
        self.device, self.mode = device, mode
        self._open: dict[str, TransferUpdate | None] = {}  # this rank's outcome, once settled
        self._decided: list[TransferUpdate] = []  # merged, not yet reported

    @classmethod
    def open(cls, runner: Any, group: TensorParallel, cfg: Any) -> RankReceives:
        agent = KVTransferAgent(runner.kv_pool, runner.model_name)
        agent.delay_s = cfg.kv_transfer.read_delay_s
        return cls(agent, runner.helix, group, runner.device, cfg.kv_transfer.mode)

    def start(self, plan: StepPlan) -> None:
        """Cancel, then post this rank's share of the plan's reads; in sync mode wait until
        they settle (the step's forward must not run before its KV is in)."""
        for rid in plan.cancel_receives:
            if rid not in self._open:
                self._decided.append(TransferUpdate(rid, "cancelled", "no read in progress"))
            elif self._open[rid] is None:
                self.agent.cancel(rid)
        for recv in plan.receives:
            if recv.request_id in self._open:
                continue  # the same on every rank: the first read stands
            self._open[recv.request_id] = None
            self.agent.start(rank_share(recv, self.helix))
        if plan.receives and self.mode == "sync":
            deadline = max(r.deadline for r in plan.receives)
            self.agent.wait([r.request_id for r in plan.receives], deadline)

    def settle(self, idle: bool) -> None:
        """After a step: record this rank's settled shares, then merge the receives every rank
        settled (a collective over the CP group while any receive is open)."""
        if idle and self.agent.pending:
            self.agent.wait_any(IDLE_READ_WAIT_S)
        for u in self.agent.poll():
            if u.request_id in self._open and self._open[u.request_id] is None:
                self._open[u.request_id] = u
        if not self._open:
            return
        rids = list(self._open)
        mine = [_CODES.get(u.state, 2) if u is not None else 0 for u in map(self._open.get, rids)]
        gathered = self.group.all_gather_ints(mine, self.device).tolist()
        for i, rid in enumerate(rids):
            codes = [row[i] for row in gathered]
            if all(codes):
                local = self._open.pop(rid)
                self._decided.append(merge_states(rid, codes, local))

    def report(self, result: StepResult | None) -> StepResult | None:
        """The answering rank's result with every merged update not reported yet (kept for the
        next result when this step has none)."""
        if result is None or not self._decided:
            return result
        decided, self._decided = self._decided, []
        return msgspec.structs.replace(result, transfers=list(result.transfers) + decided)

    def close(self) -> None:
        self.agent.close()


__all__ = ["RankReceives", "merge_states", "rank_share"]
