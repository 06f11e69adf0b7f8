"""Engine actor: hosts a model runner and executes plans (it owns GPU memory, nothing else).

Host it on its own thread or process (`Runtime.spawn(..., host="thread"|"process")`): a step
blocks for the duration of the forward, and only this actor's loop waits for it.

With SM-level disaggregation two engines share one runner (weights + KV pool) in one process,
each on the CUDA stream of its own SM partition. The context engine records a CUDA event after
each plan and names it in the result's handoffs; the generation engine makes its stream wait on
that event before the first plan that reads the handed-off request's KV.

Overlapped steps: a mixed engine, and an SM-disaggregation generation engine, launch each plan
behind the one still on the device and read that one's tokens after, so the GPU goes from one
forward to the next. The generation engine launches each plan on the stream its placement
picks (the partition's or the whole GPU's); a switch orders the new stream after the old, so a
plan that reads the previous one's tokens on the device never overtakes it. The context engine
and engines that move KV between nodes run plain steps: their handoff events and KV transfers
are taken between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from greenroom.actors import Actor, handles
from greenroom.actors.placement import ContextActivity, GenerationPlacement
from greenroom.actors.step_isolation import StepIsolation
from greenroom.actors.step_profile import EngineProfile, EngineProfileQuery, StepProfile
from greenroom.bus.messages import (
    EngineInfo,
    EngineInfoQuery,
    HandoffEvent,
    Message,
    StepPlan,
    StepResult,
)
from greenroom.config import NodeConfig
from greenroom.logging import get_logger

log = get_logger(__name__)

MAX_FAILING_STEPS = 3  # consecutive steps with failed requests before the engine crashes


class InjectFault(Message):
    """Fault injection: the engine crashes on its next plan (tests and chaos runs)."""

    reason: str = "injected fault"


class InjectTransferFault(Message):
    """Fault injection on KV reads (tests): ``nixl_error`` makes the next read name an address
    no agent registered; no read starts for the next ``hold_s`` seconds (a slow transfer);
    ``hold_s=0`` lifts a hold, starting the reads it held."""

    nixl_error: bool = False
    hold_s: float = 0.0


IDLE_READ_WAIT_S = 0.002


class EngineCrashed(RuntimeError):
    pass


class HandoffEvents:
    """CUDA events of finished prefills, by id; shared by the two engines of one process.

    One event covers every request a context plan handed off, and those requests may reach
    the generation engine in different plans (or never: finished at the first token, aborted),
    so waiting does not consume an event; the oldest are forgotten past ``capacity``.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._events: OrderedDict[int, Any] = OrderedDict()
        self._next = 1
        self.capacity = capacity

    def record(self, stream) -> int:
        import torch

        event = torch.cuda.Event()
        event.record(stream)
        eid, self._next = self._next, self._next + 1
        self._events[eid] = event
        while len(self._events) > self.capacity:
            _, old = self._events.popitem(last=False)
            old.synchronize()  # long done in practice; never drop one still pending
        return eid

    def wait(self, eid: int, stream) -> None:
        event = self._events.get(eid)
        if event is not None:
            stream.wait_event(event)

    def __len__(self) -> int:
        return len(self._events)


@dataclass
class InflightStep:
    launched: Any  # greenroom.models.executor.LaunchedStep
    reply: Any  # the deferred reply of its StepPlan
    start: float
    gap_ms: float


class Engine(Actor):
    mailbox_size = 8

    def __init__(
        self,
        cfg: NodeConfig | dict,
        role: str = "mixed",
        executor_factory: Callable[[], Any] | None = None,
        stream: Any = None,
        handoffs: HandoffEvents | None = None,
        activity: ContextActivity | None = None,
        placement: GenerationPlacement | None = None,
    ):
        """SM disaggregation: the context engine marks its plans in ``activity``; the
        generation engine asks ``placement`` where to run each step (``stream`` otherwise)."""
        super().__init__()
        self.cfg = cfg if isinstance(cfg, NodeConfig) else _node_config(cfg)
        self.role = role
        self.executor_factory = executor_factory
        self.stream = stream
        self.handoffs = handoffs
        self.activity = activity
        self.placement = placement
        self.executor = None
        self.transfer = None  # KVTransferAgent: context and generation roles
        self._fault: str | None = None
        self._isolation: StepIsolation | None = None
        self._failing_steps = 0
        self.profile = StepProfile()
        # Overlapped steps (a mixed engine, an SM generation engine): the plan launched last,
        # its deferred reply and profile marks; it is finished when the next plan has been
        # launched behind it, or when its tokens are ready and no plan came.
        self.overlap = False
        self._inflight: InflightStep | None = None
        self._waiter: ThreadPoolExecutor | None = None

    async def on_start(self) -> None:
        t0 = time.perf_counter()
        if self.executor_factory is not None:
            self.executor = self.executor_factory()
        else:
            from greenroom.models.cpu_threads import use_engine_cpu_threads
            from greenroom.models.executor import PlanExecutor
            from greenroom.models.runner import ModelRunner, resolve_device

            if resolve_device(self.cfg.model.device).type == "cpu":
                threads = use_engine_cpu_threads(self.cfg.model.cpu_threads)
                log.info("cpu engine threads", threads=threads)
            runner = ModelRunner(self.cfg.model, self.cfg.kv, self.cfg.model.path)
            self.executor = PlanExecutor(runner, host_blocks=self.cfg.kv.host_blocks)
        r = self.executor.runner
        if self.cfg.role in ("context", "generation"):
            from greenroom.kv.transfer import KVTransferAgent

            self.transfer = KVTransferAgent(r.kv_pool, r.model_name)
            self.transfer.delay_s = self.cfg.kv_transfer.read_delay_s
        self.overlap = (
            self.cfg.model.overlap_steps
            # the context engine records its handoff events after each result: plain steps
            and self.role in ("mixed", "generation")
            and self.transfer is None  # KV sent or received between steps: plain steps
            and hasattr(self.executor, "launch")
        )
        if self.overlap and r.device.type == "cuda":
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-tokens")
        log.info(
            "engine ready",
            role=self.role,
            model=r.model_name,
            device=str(r.device),
            num_blocks=r.num_blocks,
            load_s=round(time.perf_counter() - t0, 3),
        )

    @handles(EngineInfoQuery)
    async def info(self, _: EngineInfoQuery) -> EngineInfo:
        r = self.executor.runner
        return EngineInfo(
            num_blocks=r.num_blocks,
            tokens_per_block=r.tokens_per_block,
            max_model_len=r.max_model_len,
            vocab_size=r.vocab_size,
            eos_token_ids=list(r.eos_token_ids),
            device=str(r.device),
            model_name=r.model_name,
            kv_agent=self.transfer.info() if self.transfer is not None else None,
        )

    @handles(InjectFault)
    async def inject(self, msg: InjectFault) -> None:
        self._fault = msg.reason

    @handles(InjectTransferFault)
    async def inject_transfer(self, msg: InjectTransferFault) -> None:
        if self.transfer is None:
            raise ValueError("this engine moves no KV (role mixed)")
        if msg.nixl_error:
            self.transfer.fail_next = "injected"
        self.transfer.hold_until = time.time() + msg.hold_s if msg.hold_s else 0.0

    @handles(EngineProfileQuery)
    def profile_query(self, msg: EngineProfileQuery) -> EngineProfile:
        steps = [r.as_row() for r in self.profile.steps] if msg.steps else []
        out = EngineProfile(**self.profile.summary(), steps=steps)
        if msg.reset:
            self.profile.reset()
        self.executor.time_forwards = msg.gpu_timing
        return out

    async def on_stop(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
            self.transfer = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            _answer(inflight.reply, error=EngineCrashed("the engine stopped"))
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
        # drop every reference to GPU memory (the executor, and the factory and placement
        # that may hold a shared runner), so the process's memory returns on stop
        self.executor = self.executor_factory = self.placement = None
        self._isolation = None

    @handles(StepPlan)
    def step(self, plan: StepPlan) -> StepResult | None:
        if self._fault is not None:
            self._settle_inflight()
            self.crash(EngineCrashed(self._fault))
        if self.transfer is not None:
            self._start_reads(plan)
        if self.overlap:
            stream = self._pick_stream()
            with self._on_stream(plan, stream):
                return self._step_overlapped(plan)
        start, gap_ms = self.profile.begin()
        marks = self.activity is not None and bool(plan.steps)
        if marks:
            self.activity.begin()
        try:
            stream = self._pick_stream()
            if stream is None:
                result = self._execute(plan)
            else:
                result = self._execute_on_stream(plan, stream)
        except Exception as exc:  # a failure every request of the plan shares: crash
            self.crash(exc)
        finally:
            if marks:
                self.activity.end()
        if plan.steps:
            self._record(plan, start, gap_ms)
        if self.transfer is not None:
            if not plan.steps and self.transfer.pending:
                self.transfer.wait_any(IDLE_READ_WAIT_S)
            updates = self.transfer.poll()
            if updates:
                result = msgspec.structs.replace(result, transfers=updates)
        if self.role == "context" and result.sampled:
            eid = self.handoffs.record(self.stream) if self.stream is not None else 0
            result = StepResult(
                iteration=result.iteration,
                sampled=result.sampled,
                handoffs=[HandoffEvent(s.request_id, eid) for s in result.sampled],
                flow=plan.flow,
                duration_s=result.duration_s,
                failed=result.failed,
            )
        return result

    def _pick_stream(self) -> Any:
        """The stream of the next step (None: the current one). The placement's pick also
        sets the graphs the executor replays; a launched step keeps the kind it was launched
        with (the forward is queued during ``launch``)."""
        if self.placement is not None:
            stream, self.executor.graph_kind = self.placement.pick()
            return stream
        return self.stream

    @contextlib.contextmanager
    def _on_stream(self, plan: StepPlan, stream: Any) -> Iterator[None]:
        """Queue the step's work on ``stream``, after the handoff events of the plan's new
        sequences (their KV was written on the context engine's stream)."""
        if stream is None:
            yield
            return
        import torch

        with torch.cuda.stream(stream):
            if self.handoffs is not None:
                for seq in plan.new:
                    if seq.handoff_event_id:
                        self.handoffs.wait(seq.handoff_event_id, stream)
            yield

    def _execute(self, plan: StepPlan) -> StepResult:
        """Run a plan; requests whose step fails alone fail alone (``result.failed``). Steps
        failing again and again are the engine's fault, not the requests': it crashes, and
        its supervisor counts that against the restart limit."""
        isolation = self._step_isolation()
        plan, earlier = isolation.strip(plan)
        result = self._count_failures(isolation.run(plan), len(plan.steps))
        if earlier:
            result = msgspec.structs.replace(result, failed={**result.failed, **earlier})
        return result

    def _step_isolation(self) -> StepIsolation:
        if self._isolation is None:
            self._isolation = StepIsolation(
                self.executor.execute,
                self.executor.sequences,
                getattr(self.executor, "_forget", None),
            )
        return self._isolation

    def _count_failures(self, result: StepResult, num_steps: int) -> StepResult:
        if len(result.failed) < num_steps or not num_steps:  # some request ran
            self._failing_steps = 0
        if not result.failed:
            return result
        self._failing_steps += len(result.failed) == num_steps
        log.warning(
            "requests failed in a step; the others ran",
            failed=list(result.failed)[:8],
            error=next(iter(result.failed.values()))[:300],
            consecutive=self._failing_steps,
        )
        if self._failing_steps >= MAX_FAILING_STEPS:
            raise EngineCrashed(
                f"{self._failing_steps} consecutive steps failed "
                f"(last: {next(iter(result.failed.values()))})"
            )
        return result

    def _start_reads(self, plan: StepPlan) -> None:
        """Cancel, then post the plan's KV reads; in sync mode wait until they settle, so the
        requests enter the decode flow only with their KV (or with an error)."""
        for rid in plan.cancel_receives:
            self.transfer.cancel(rid)
        for recv in plan.receives:
            self.transfer.start(recv)
        if plan.receives and self.cfg.kv_transfer.mode == "sync":
            deadline = max(r.deadline for r in plan.receives)
            self.transfer.wait([r.request_id for r in plan.receives], deadline)

    # ------------------------------------------------------------------ overlapped steps

    def _step_overlapped(self, plan: StepPlan) -> None:
        """Launch ``plan`` behind the one in flight, then finish that one: the GPU goes from
        one forward to the next while the host reads tokens and sends results. Runs inside
        the step's stream (``_on_stream``): the launch, its token read-back event and the
        plain fallbacks all queue there."""
        isolation = self._step_isolation()
        if isolation.strip(plan)[1]:  # it steps requests failed meanwhile: run it plainly
            self._settle_inflight()
            try:
                return self._execute(plan)
            except Exception as exc:
                self.crash(exc)
        start, gap_ms = self.profile.begin()
        saved = isolation.save(plan)
        try:
            launched = self.executor.launch(plan)
        except Exception as exc:
            self._settle_inflight()  # results stay in plan order
            try:  # the requests whose data broke it fail alone; the others run now
                return self._count_failures(isolation.recover(plan, saved, exc), len(plan.steps))
            except Exception as again:
                self.crash(again)
        reply = self.take_reply()
        self._settle_inflight()
        inflight = InflightStep(launched, reply, start, gap_ms)
        self._inflight = inflight
        self.profile.overlapped_steps += bool(plan.steps)
        if self._waiter is None:
            asyncio.get_running_loop().call_soon(self._settle_if_idle, inflight)
        else:
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(self._waiter, launched.wait)
            done.add_done_callback(lambda _f, i=inflight: self._settle_if_idle(i))
        self.profile.mark_idle()
        return None

    def _settle_if_idle(self, inflight: InflightStep) -> None:
        """Its tokens are on the host and no plan was launched behind it: finish it now."""
        if self._inflight is inflight:
            self._settle_inflight()

    def _settle_inflight(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        try:
            result = self.executor.finish(inflight.launched)
        except Exception as exc:
            _answer(inflight.reply, error=exc)
            return
        if inflight.launched.plan.steps:
            launched = inflight.launched
            self._record(launched.plan, inflight.start, inflight.gap_ms, launched.forward_events)
        _answer(inflight.reply, result)

    def _record(self, plan: StepPlan, start: float, gap_ms: float, events=None) -> None:
        """``events``: the step's forward events (overlapped steps: its own, not the latest
        launch's, which may still run on the device)."""
        gpu_ms = None
        events = events if events is not None else self.executor.forward_events
        if self.executor.time_forwards and events is not None:
            events[1].synchronize()  # done already: its tokens were read back
            gpu_ms = events[0].elapsed_time(events[1])
        decode_only = all(s.num_tokens == 1 for s in plan.steps)
        self.profile.end(
            start,
            gap_ms,
            decode_only,
            len(plan.steps),
            gpu_ms,
            getattr(self.executor, "last_timing", None),
            sum(s.num_tokens for s in plan.steps),
        )

    def _execute_on_stream(self, plan: StepPlan, stream) -> StepResult:
        with self._on_stream(plan, stream):
            return self._execute(plan)


def _answer(reply: Any, value: Any = None, error: BaseException | None = None) -> None:
    """Settle a reply taken with ``take_reply``; an error reaches the asker as a RemoteError."""
    from greenroom.actors.cell import settle
    from greenroom.actors.errors import ActorError, RemoteError

    if reply is None:
        return
    if error is not None and not isinstance(error, ActorError):
        error = RemoteError(type(error).__name__, str(error))
    settle(reply, value, error)


def _node_config(data: dict) -> NodeConfig:
    from greenroom.config import build_config

    return build_config(data)


__all__ = [
    "Engine",
    "EngineCrashed",
    "EngineProfileQuery",
    "HandoffEvents",
    "InjectFault",
    "InjectTransferFault",
]
