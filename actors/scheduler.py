"""Scheduler actor: owns request state and drives one plan flow per engine.

The planning logic lives in `greenroom.actors.scheduling` (pure, no I/O); this actor only moves
messages: per iteration and flow it asks the KV manager for the batch's block changes, sends the
plan to the flow's engine without waiting for it (up to `plans_in_flight` plans run ahead), and
streams each result's deltas to the frontend. Mixed mode has one flow; SM-level disaggregation
has two (context, generation) as two tasks of this one actor, interleaving on one event loop;
under adaptive routing both admit prompts (``prompt_routing``: long ones to the context flow,
short ones into generation steps).

Under pipeline parallelism the flow keeps up to ``pp_depth`` micro-batches in flight, each with
its own requests, and applies each result as it comes (in any order): a micro-batch that can be
built is issued at once, whatever results are outstanding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from greenroom.actors import Actor, ActorCrashed, ActorError, ActorRef, handles
from greenroom.actors.scheduling import FlowBudget, SchedulerCore
from greenroom.actors.scheduling.routing import PromptRouting
from greenroom.bus.messages import (
    CancelRequests,
    EngineInfo,
    EngineInfoQuery,
    KVAgentChanged,
    Message,
    OutputBatch,
    RequestError,
    StepPlan,
    StepResult,
    SubmitRequest,
    TransferDone,
)
from greenroom.config import NodeConfig, sm_disagg_budgets
from greenroom.logging import get_logger

log = get_logger(__name__)

KV_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 600.0
ENGINE_RESTART_S = 300.0


class SchedulerStatsQuery(Message):
    pass


class Drain(Message):
    """Fail every request with `message` (node shutdown) and stop planning."""

    message: str = "the server is shutting down"


def flow_budgets(cfg: NodeConfig) -> list[FlowBudget]:
    sc = cfg.scheduler
    if not cfg.sm_disagg.enabled:
        return [FlowBudget("mixed", sc.max_num_tokens, sc.max_batch_size)]
    ctx_tokens, ctx_batch = sm_disagg_budgets(cfg)
    return [
        FlowBudget("context", ctx_tokens, ctx_batch),
        FlowBudget("generation", sc.max_num_tokens, sc.max_batch_size),
    ]


def prompt_routing(cfg: NodeConfig) -> PromptRouting | None:
    """How prompts split between the SM-disaggregation flows; None in mixed mode. The node
    fills ``sm_disagg.routing_threshold_tokens`` with its measurement when the config leaves 0."""
    sd = cfg.sm_disagg
    if not sd.enabled:
        return None
    if sd.policy == "adaptive" and sd.routing_threshold_tokens < 1:
        raise ValueError(
            "sm_disagg.routing_threshold_tokens = 0 reached the scheduler: the node measures it "
            "at start (or set it in the config)"
        )
    return PromptRouting(
        sd.policy, max(1, sd.routing_threshold_tokens), ride_when_idle=sd.ride_when_generation_idle
    )


def plans_limit(cfg: NodeConfig) -> int:
    """Plans a flow keeps in flight: ``pp_depth`` micro-batches under pipeline parallelism
    (``pp_size`` by default), else ``plans_in_flight``."""
    if cfg.parallel.pp_size > 1:
        return cfg.scheduler.pp_depth or cfg.parallel.pp_size
    return cfg.scheduler.plans_in_flight


def _ready(pending: deque[asyncio.Future], any_order: bool) -> bool:
    if any_order:
        return any(f.done() for f in pending)
    return bool(pending) and pending[0].done()


class Scheduler(Actor):
    mailbox_size = 8192

    def __init__(
        self,
        cfg: NodeConfig,
        info: EngineInfo,
        kv: ActorRef,
        engines: dict[str, ActorRef],
        frontend: ActorRef,
    ):
        super().__init__()
        self.cfg = cfg
        self.kv = kv
        self.engines = engines
        self.frontend = frontend
        self.flows = flow_budgets(cfg)
        self.core = SchedulerCore(
            cfg.scheduler,
            tokens_per_block=info.tokens_per_block,
            max_model_len=info.max_model_len,
            eos_token_ids=list(info.eos_token_ids),
            flows=self.flows,
            pipelined=cfg.parallel.pp_size > 1,
            routing=prompt_routing(cfg),
        )
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._draining = False

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        for flow in self.flows:
            self._wake[flow.name] = asyncio.Event()
            self._tasks.append(
                loop.create_task(self._run_flow(flow.name), name=f"flow-{flow.name}")
            )
        self._tasks.append(loop.create_task(self._expire_requests(), name="request-timeouts"))

    async def on_stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _wake_all(self) -> None:
        for ev in self._wake.values():
            ev.set()

    async def _emit(self, out: OutputBatch | None) -> None:
        if out is not None and (out.deltas or out.errors or out.handles or out.transfers):
            await self.frontend.tell(out)

    # ------------------------------------------------------------------ requests

    async def _refuse(self, req: SubmitRequest, kind: str, message: str) -> None:
        """End a request before it enters the core (a receiver hears its read will not happen)."""
        done = [TransferDone(req.request_id, "error", message)] if req.kv_handle else []
        err = RequestError(request_id=req.request_id, kind=kind, message=message)
        await self._emit(OutputBatch(errors=[err], transfers=done))

    @handles(SubmitRequest)
    async def submit(self, req: SubmitRequest) -> None:
        """Queue a request; every refusal reaches the client as an error."""
        if self._draining:
            await self._refuse(req, "failed", "the server is shutting down")
            return
        if self.core.num_waiting >= self.cfg.scheduler.max_queue_size:
            await self._refuse(
                req,
                "overloaded",
                f"overloaded: {self.core.num_waiting} requests are waiting "
                f"(max_queue_size {self.cfg.scheduler.max_queue_size}); retry later",
            )
            return
        try:
            self.core.submit(req)
        except ValueError as exc:
            await self._refuse(req, "invalid", str(exc))
            return
        self._wake_all()

    @handles(CancelRequests)
    async def cancel(self, msg: CancelRequests) -> None:
        await self._emit(self.core.cancel(list(msg.request_ids), msg.reason))
        self._wake_all()

    @handles(Drain)
    async def drain(self, msg: Drain) -> int:
        self._draining = True
        out = self.core.fail_all(msg.message)
        await self._emit(out)
        self._wake_all()
        return len(out.errors)

    @handles(SchedulerStatsQuery)
    async def stats(self, _: SchedulerStatsQuery) -> dict:
        return self.core.stats()

    async def _expire_requests(self) -> None:
        """End requests older than `request_timeout_s` with a "timeout" error (no request
        waits forever, whatever the engine or the client do)."""
        timeout = self.cfg.scheduler.request_timeout_s
        period = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            expired = self.core.expired(time.time(), timeout)
            if expired:
                log.warning("requests timed out", count=len(expired), timeout_s=timeout)
                await self._emit(self.core.cancel(expired, "timeout"))
                self._wake_all()

    # ------------------------------------------------------------------ plan flows

    async def _run_flow(self, flow: str) -> None:
        """Issue plans while there is room and work; consume results in order."""
        engine = self.engines[flow]
        wake = self._wake[flow]
        pending: deque[asyncio.Future] = deque()
        try:
            await self._flow_loop(flow, engine, wake, pending)
        finally:  # stopping: plans still out are abandoned, and their outcome is retrieved
            for fut in pending:
                fut.cancel()
                fut.add_done_callback(_retrieve)

    async def _flow_loop(self, flow: str, engine, wake: asyncio.Event, pending: deque) -> None:
        limit = plans_limit(self.cfg)
        pipelined = self.core.pipelined
        while True:
            if len(pending) < limit and self.core.has_work(flow):
                plan = await self._build_plan(flow)
                if plan is not None:
                    fut = asyncio.ensure_future(engine.ask(plan, timeout=STEP_TIMEOUT_S))
                    fut.add_done_callback(lambda _f, w=wake: w.set())
                    pending.append(fut)
                    continue
            if _ready(pending, pipelined):
                await self._consume(flow, pending, pipelined)
                continue
            wake.clear()
            if _ready(pending, pipelined):
                continue
            if len(pending) < limit and self.core.has_work(flow):
                # work exists but no plan could be built (e.g. no free blocks): poll gently
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=0.005)
                continue
            await wake.wait()

    async def _build_plan(self, flow: str) -> StepPlan | None:
        step = self.core.build_kv_step(flow)
        if step is None:
            return None
        try:
            result = await self.kv.ask(step, timeout=KV_TIMEOUT_S)
        except ActorError as exc:
            log.error("kv manager failed", flow=flow, error=repr(exc))
            await self._emit(self.core.fail_all(f"KV manager failed: {exc}"))
            return None
        plan = self.core.apply_kv_result(flow, result)
        await self._emit(self.core.take_output())  # e.g. a prompt that can never fit the pool
        return plan

    async def _consume(
        self, flow: str, pending: deque[asyncio.Future], pipelined: bool = False
    ) -> None:
        """Apply the oldest plan's result (pipelined: any that is done); on an engine failure,
        settle every plan in flight first (they went to the same engine) and fail their
        requests once."""
        fut = pending[0]
        if pipelined:
            fut = next(f for f in pending if f.done())
        pending.remove(fut)
        try:
            result: StepResult = fut.result()
        except (ActorError, TimeoutError) as exc:
            crashed = isinstance(exc, ActorCrashed)
            log.error("engine crashed" if crashed else "step failed", flow=flow, error=repr(exc))
            while pending:
                with contextlib.suppress(Exception):
                    await pending.popleft()
            what = "crashed" if crashed else "step failed"
            await self._emit(self.core.fail_inflight(flow, f"the engine {what}: {exc}"))
            if crashed:
                self.core.engine_lost_kv()
                await self._await_engine(flow)
            self._wake_all()
            return
        await self._emit(self.core.apply_step_result(flow, result))
        self._wake_all()

    async def _await_engine(self, flow: str, deadline_s: float = ENGINE_RESTART_S) -> None:
        """Hold the flow until the supervisor's restarted engine answers (bounded)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while loop.time() < end:
            try:
                info = await self.engines[flow].ask(
                    EngineInfoQuery(), timeout=max(0.1, end - loop.time())
                )
                if info.kv_agent is not None:
                    await self.kv.tell(KVAgentChanged(agent=info.kv_agent))
                log.info("engine back", flow=flow)
                return
            except (ActorError, TimeoutError):
                await asyncio.sleep(0.05)
        log.error("engine did not come back", flow=flow, waited_s=deadline_s)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
