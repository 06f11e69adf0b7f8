"""The engine of a multi-rank node, as the scheduler sees it: one actor per rank group.

It stands where the single-process Engine stands (same messages: StepPlan -> StepResult,
EngineInfoQuery, InjectFault), but executes nothing itself. On start it opens a new epoch:
it starts the rank workers of node 0, tells the other nodes' agents to start theirs, and
waits until every rank is ready. Each plan goes to every rank with the epoch and the next plan
id; the reply comes later from rank 0, or from TP rank 0 of the last pipeline stage (the
handler takes the ask's reply and returns at once, so the next plan, or the next micro-batch,
reaches the ranks while this one runs).

A rank that exits, fails, or whose node agent goes silent crashes this actor: every plan in
flight fails with ActorCrashed (the scheduler fails their requests with an error), the
workers of the epoch are killed on every node, and the supervisor starts a fresh
incarnation — the whole group restarts, or past the restart limit the node stops.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any

import msgspec

from greenroom.actors import Actor, handles
from greenroom.actors.cell import settle
from greenroom.actors.engine import EngineCrashed, InjectFault
from greenroom.actors.errors import ActorCrash, ActorCrashed, RemoteError
from greenroom.bus.codec import encode
from greenroom.bus.messages import EngineInfo, EngineInfoQuery, StepPlan
from greenroom.config import NodeConfig
from greenroom.logging import get_logger
from greenroom.parallel import messages as m
from greenroom.parallel.hub import RankHub
from greenroom.parallel.layout import RankLayout
from greenroom.parallel.local_ranks import LocalRanks
from greenroom.parallel.worker import WorkerSpec

log = get_logger(__name__)


def layout_of(cfg: NodeConfig) -> RankLayout:
    p = cfg.parallel
    return RankLayout(p.pp_size, p.cp_size, p.tp_size, p.nnodes)


class RankGroupEngine(Actor):
    mailbox_size = 8

    def __init__(self, cfg: NodeConfig, hub: RankHub, store_addr: str, store_port: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.hub = hub
        self.layout = layout_of(cfg)
        self.store_addr, self.store_port = store_addr, store_port
        self.epoch = 0
        self.info: EngineInfo | None = None
        self.local: LocalRanks | None = None
        self._plan_id = 0
        self._results = 0  # results received from the ranks
        self._pending: dict[int, Any] = {}  # plan id -> the scheduler's reply
        self._ready: dict[int, m.RankReady] = {}
        self._start_failure: asyncio.Future | None = None
        self._fault: str | None = None
        # parallel.stage_reports: (stage, plan id, start, end) and each plan's request ids
        self.stage_runs: deque[tuple[int, int, float, float]] = deque(maxlen=100_000)
        self.plan_requests: dict[int, list[str]] = {}

    async def on_start(self) -> None:
        p = self.cfg.parallel
        self.epoch = self.hub.next_epoch()
        loop = asyncio.get_running_loop()
        self._start_failure = loop.create_future()
        self.hub.listener = self._on_message
        await self.hub.wait_agents(p.start_timeout_s)
        spec = WorkerSpec(
            epoch=self.epoch,
            pp_size=p.pp_size,
            cp_size=p.cp_size,
            tp_size=p.tp_size,
            nnodes=p.nnodes,
            bus_address=self.hub.address,
            store_addr=self.store_addr,
            store_port=self.store_port,
            config=msgspec.to_builtins(self.cfg),
            timeout_s=p.collective_timeout_s,
            sys_path=[x for x in sys.path if x],
        )
        self.local = LocalRanks(self._on_local_exit)
        own = self.hub.security
        local_spec = spec
        if own is not None:  # node 0's workers present node 0's key (the agents: their own)
            keys = (own.public_key, own.public_key, own.secret_key)
            local_spec = msgspec.structs.replace(spec, bus_keys=keys)
        self.local.start(local_spec, self.layout.ranks_on_node(0))
        self.hub.send_agents(
            m.StartRanks(epoch=self.epoch, worker_spec=msgspec.msgpack.encode(spec))
        )
        everyone = asyncio.ensure_future(self._all_ready())
        try:
            done, _ = await asyncio.wait(
                [everyone, self._start_failure],
                timeout=p.start_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self._start_failure in done:
                raise RuntimeError(self._start_failure.result())
            if everyone not in done:
                missing = sorted(set(range(self.layout.world_size)) - set(self._ready))
                raise TimeoutError(
                    f"rank(s) {missing} were not ready within {p.start_timeout_s:g} s"
                )
        except BaseException:
            everyone.cancel()
            self._stop_ranks()
            raise
        self._start_failure = None
        self.info = self._ready[0].info
        log.info("rank group ready", epoch=self.epoch, world_size=self.layout.world_size)

    async def _all_ready(self) -> None:
        while len(self._ready) < self.layout.world_size:
            await asyncio.sleep(0.01)

    async def on_stop(self) -> None:
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            settle(reply, None, ActorCrashed(f"rank group epoch {self.epoch} stopped"))
        self._stop_ranks()

    def _stop_ranks(self) -> None:
        if self.hub.listener == self._on_message:
            self.hub.listener = None
        if self.local is not None:
            self.local.kill_all()
        self.hub.send_agents(m.StopRanks(epoch=self.epoch))

    # ------------------------------------------------------------------ rank events

    def _on_local_exit(self, epoch: int, rank: int, code: int) -> None:
        self._fail(f"rank {rank} exited with code {code}")

    def _on_message(self, msg: Any) -> None:
        if getattr(msg, "epoch", self.epoch) != self.epoch:
            return  # a late message of an earlier incarnation
        if isinstance(msg, m.RankResult):
            reply = self._pending.pop(msg.plan_id, None)
            if reply is None:
                return
            self._results += 1
            if msg.error is not None:
                settle(reply, None, RemoteError("PlanError", msg.error))
            else:
                settle(reply, msg.result)
        elif isinstance(msg, m.StageRan):
            self.stage_runs.append((msg.stage, msg.plan_id, msg.start, msg.end))
        elif isinstance(msg, m.RankReady):
            self._ready[msg.rank] = msg
        elif isinstance(msg, m.RankFailed):
            self._fail(f"rank {msg.rank} failed: {msg.error}")
        elif isinstance(msg, m.RankExited):
            what = f"rank {msg.rank}" if msg.rank >= 0 else f"the agent of node {-1 - msg.rank}"
            self._fail(f"{what} exited with code {msg.code}")

    def _fail(self, reason: str) -> None:
        log.error("rank group failed", epoch=self.epoch, reason=reason)
        if self._start_failure is not None and not self._start_failure.done():
            self._start_failure.set_result(reason)
            return
        if self.info is not None:
            self.crash(EngineCrashed(reason))

    # ------------------------------------------------------------------ engine messages

    @handles(EngineInfoQuery)
    def engine_info(self, _: EngineInfoQuery) -> EngineInfo:
        return self.info

    @handles(InjectFault)
    def inject(self, msg: InjectFault) -> None:
        self._fault = msg.reason

    @handles(m.HoldResults)
    async def hold_results(self, msg: m.HoldResults) -> None:
        """Fault hook: the answering rank holds its results back (``hold``) or sends them."""
        frames = encode(m.HoldResults(epoch=self.epoch, hold=msg.hold))
        for rank in range(self.layout.world_size):
            await self.hub.send_rank_waiting(rank, frames)

    @handles(m.StageRunsQuery)
    def stage_runs_query(self, _: m.StageRunsQuery) -> m.StageRuns:
        return m.StageRuns(
            runs=[list(r) for r in self.stage_runs],
            plan_requests={str(k): v for k, v in self.plan_requests.items()},
            results=self._results,
            rank_pids={str(k): v for k, v in (self.local.pids if self.local else {}).items()},
        )

    @handles(StepPlan)
    async def step(self, plan: StepPlan) -> None:
        if self._fault is not None:
            raise ActorCrash(self._fault)
        reply = self.take_reply()
        self._plan_id += 1
        self._pending[self._plan_id] = reply
        if self.cfg.parallel.stage_reports:
            self.plan_requests[self._plan_id] = [s.request_id for s in plan.steps]
        frames = encode(m.RankPlan(epoch=self.epoch, plan_id=self._plan_id, plan=plan))
        for rank in range(self.layout.world_size):
            if not self.hub.send_rank(rank, frames):
                await self.hub.send_rank_waiting(rank, frames)
