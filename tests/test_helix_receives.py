"""A Helix generation rank's share of KV receives: which blocks it reads, and how the ranks'
outcomes merge into one update per receive."""

from __future__ import annotations

import torch

from greenroom.bus.messages import KVReceive, StepPlan, StepResult, TransferHandle, TransferUpdate
from greenroom.kv.helix_placement import HelixPlacement
from greenroom.models.helix_batch import HelixRank
from greenroom.parallel.rank_receives import RankReceives, merge_states, rank_share

BPR = 10  # blocks per rank, the null block included


def receive(rid: str, remote: list[int], local: list[int]) -> KVReceive:
    handle = TransferHandle(
        request_id=rid, agent_name="ctx", agent_metadata=b"", pool_address=0, block_bytes=8,
        pool_blocks=64, mem_type="DRAM", device_id=0, block_ids=remote, num_tokens=4 * len(remote),
        first_token=5, tokens_per_block=4, tp_size=1, kv_layout="x", lease_deadline=1e12,
    )  # fmt: skip
    return KVReceive(
        request_id=rid, handle=handle, remote_blocks=remote, local_blocks=local, deadline=1e12
    )


def helix(rank: int, cp: int = 3) -> HelixRank:
    return HelixRank(HelixPlacement(cp, 4), rank, BPR)


def test_each_rank_reads_only_its_blocks_into_its_own_pool():
    # blocks 0..6 of a request, block j on rank j mod 3: global id = rank * 10 + local id
    local = [1, 11, 21, 2, 12, 22, 3]
    recv = receive("a", [40, 41, 42, 43, 44, 45, 46], local)
    shares = [rank_share(recv, helix(r)) for r in range(3)]
    assert [s.remote_blocks for s in shares] == [[40, 43, 46], [41, 44], [42, 45]]
    assert [s.local_blocks for s in shares] == [[1, 2, 3], [1, 2], [1, 2]]
    # the local prefix cache held the first three: the read starts at block 3 (rank 0)
    tail = rank_share(receive("b", [43, 44, 45, 46], local[3:]), helix(2))
    assert tail.remote_blocks == [45] and tail.local_blocks == [2]
    assert rank_share(receive("c", [40], [1]), helix(1)).remote_blocks == []


def test_a_receive_completes_only_when_every_share_completed():
    done = TransferUpdate("a", "complete")
    assert merge_states("a", [1, 1, 1], done) == done
    failed = merge_states("a", [1, 4, 2], done)
    assert (failed.state, failed.message) == ("error", "on CP rank 2")
    mine = TransferUpdate("a", "timed_out", "the KV read did not finish in time")
    assert merge_states("a", [3, 1], mine) == mine


class FakeAgent:
    """Posts nothing: each read settles when the test says."""

    def __init__(self) -> None:
        self.started: list[KVReceive] = []
        self.cancelled: list[str] = []
        self.settled: list[TransferUpdate] = []

    @property
    def pending(self) -> int:
        return 0

    def start(self, recv: KVReceive) -> None:
        self.started.append(recv)

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)
        self.settled.append(TransferUpdate(rid, "cancelled"))

    def poll(self) -> list[TransferUpdate]:
        out, self.settled = self.settled, []
        return out


class FakeGroup:
    """The CP group's all-gather: this rank's codes, then the other ranks' rows (given)."""

    def __init__(self) -> None:
        self.others: list[list[int]] = []
        self.calls = 0

    def all_gather_ints(self, values: list[int], device) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([values] + [row[: len(values)] for row in self.others])


def test_the_ranks_report_a_receive_once_all_settled_and_keep_unreported_ones():
    agent, group = FakeAgent(), FakeGroup()
    rr = RankReceives(agent, helix(0, cp=2), group, "cpu", "async")
    plan = StepPlan(iteration=1, receives=[receive("a", [40, 41], [1, 11])])
    rr.start(plan)
    assert agent.started[0].local_blocks == [1]
    group.others = [[0]]
    rr.settle(idle=False)
    assert rr.report(StepResult(iteration=1)).transfers == []
    agent.settled.append(TransferUpdate("a", "complete"))
    rr.settle(idle=False)  # this rank is done, rank 1 still reads
    assert rr.report(StepResult(iteration=2)).transfers == []
    group.others = [[1]]
    rr.settle(idle=False)
    assert rr.report(None) is None  # a step without a result keeps it for the next
    assert rr.report(StepResult(iteration=3)).transfers == [TransferUpdate("a", "complete")]
    calls = group.calls
    rr.settle(idle=False)  # nothing open: no collective
    assert group.calls == calls
    rr.start(StepPlan(iteration=4, cancel_receives=["a"]))  # settled already
    assert agent.cancelled == []
    assert rr.report(StepResult(iteration=4)).transfers == [
        TransferUpdate("a", "cancelled", "no read in progress")
    ]
