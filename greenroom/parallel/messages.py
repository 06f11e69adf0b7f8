"""Messages between the head, node agents and rank workers (the rank bus).

Plans and results only: tensors between ranks go through torch.distributed. Every plan
carries the group's epoch and a plan id (consecutive from 1 within an epoch); each rank
checks both, and the ranks of a TP group compare plan ids through a collective, so a rank
that missed or reordered a plan fails loudly instead of computing with the others' tensors.
"""

from __future__ import annotations

from greenroom.bus.messages import EngineInfo, Message, StepPlan, StepResult


class AgentHello(Message):
    """A node agent (node_rank > 0) reports to the head and waits for StartRanks."""

    node_rank: int
    nnodes: int
    world_size: int
    host: str


class AgentRejected(Message):
    """The head refuses an agent (a node rank given twice, a layout that disagrees)."""

    reason: str


class StartRanks(Message):
    """Agents: start the rank workers of your node for this epoch."""

    epoch: int
    worker_spec: bytes  # msgpack WorkerSpec without the rank (each agent fills its ranks in)


class StopRanks(Message):
    """Agents: kill the rank workers of this epoch (the group restarts or the node stops)."""

    epoch: int


class Shutdown(Message):
    reason: str = "the head is stopping"


class Ping(Message):
    """Head -> agents every second; an agent that hears none for a while exits."""


class RankExited(Message):
    """Agent -> head: a rank worker of the current epoch exited."""

    epoch: int
    rank: int
    code: int


class RankHello(Message):
    epoch: int
    rank: int
    pid: int
    host: str


class RankReady(Message):
    epoch: int
    rank: int
    info: EngineInfo


class RankFailed(Message):
    """A rank could not start (or hit an error it cannot continue from)."""

    epoch: int
    rank: int
    error: str


class RankPlan(Message):
    epoch: int
    plan_id: int
    plan: StepPlan


class RankResult(Message):
    """Rank 0's answer to a plan: the step result, or the plan's error (every rank of the
    group rejects the same plan the same way, before any collective)."""

    epoch: int
    plan_id: int
    result: StepResult | None = None
    error: str | None = None


class HoldResults(Message):
    """Fault hook (tests): the answering rank holds its results back while ``hold``, then
    sends them all; the other ranks and stages go on running plans."""

    epoch: int
    hold: bool


class StageRan(Message):
    """With ``parallel.stage_reports``: TP rank 0 of stage ``stage`` ran plan ``plan_id``
    from ``start`` to ``end`` (monotonic clock of its host)."""

    epoch: int
    stage: int
    plan_id: int
    start: float
    end: float


class StageRunsQuery(Message):
    """Ask the group engine for the stage reports it has (``parallel.stage_reports``)."""


class StageRuns(Message):
    runs: list[list[float]]  # [stage, plan id, start, end]
    plan_requests: dict[str, list[str]]  # plan id -> the request ids it stepped
    results: int  # results received from the answering rank so far
    rank_pids: dict[str, int] = {}  # this node's rank workers (tests kill one)
