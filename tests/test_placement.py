"""Where the SM-disaggregation generation engine decodes: its partition while the context
engine runs a plan, the whole GPU while it idles (CPU: stand-in streams and executors)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from greenroom.actors.engine import Engine
from greenroom.actors.placement import (
    PARTITION,
    WHOLE_GPU,
    ContextActivity,
    GenerationPlacement,
)
from greenroom.bus.messages import SequenceStep, StepPlan, StepResult
from greenroom.config import load_config


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.waited_on: list[str] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited_on.append(other.name)


def test_activity_counts_running_plans() -> None:
    activity = ContextActivity()
    assert not activity.busy
    activity.begin()
    assert activity.busy
    activity.end()
    assert not activity.busy and activity.plans == 1


def test_generation_takes_the_whole_gpu_only_while_the_context_engine_idles() -> None:
    part, whole, activity = FakeStream("part"), FakeStream("whole"), ContextActivity()
    placement = GenerationPlacement(part, whole, activity)
    assert placement.pick() == (whole, WHOLE_GPU)
    assert placement.pick() == (whole, WHOLE_GPU)
    activity.begin()
    assert placement.pick() == (part, PARTITION)
    assert part.waited_on == ["whole"]  # the switch orders the partition after the whole GPU
    assert placement.pick() == (part, PARTITION)
    activity.end()
    assert placement.pick() == (whole, WHOLE_GPU)
    assert whole.waited_on == ["part"] and part.waited_on == ["whole"]
    assert placement.steps == {PARTITION: 2, WHOLE_GPU: 3}


def test_without_whole_gpu_graphs_every_step_stays_on_the_partition() -> None:
    part = FakeStream("part")
    placement = GenerationPlacement(part, None, ContextActivity())
    assert [placement.pick() for _ in range(3)] == [(part, PARTITION)] * 3
    assert part.waited_on == []


class FakeExecutor:
    """Records, per plan, whether the context engine was busy and which graphs it was told."""

    def __init__(self, activity: ContextActivity) -> None:
        self.activity = activity
        self.graph_kind = "decode"
        self.time_forwards = False
        self.forward_events = None
        self.seen: list[tuple[bool, str]] = []
        self.sequences: dict = {}  # what step isolation reads to re-run a failed step in parts

    def execute(self, plan: StepPlan) -> StepResult:
        self.seen.append((self.activity.busy, self.graph_kind))
        if plan.iteration < 0:
            raise RuntimeError("fault in the forward")
        return StepResult(iteration=plan.iteration, flow=plan.flow)


@pytest.fixture
def cfg():
    return load_config(overrides={"port": 0, "log_level": "warning"})


def test_context_engine_marks_its_plans_busy_even_when_one_fails(cfg, monkeypatch) -> None:
    activity = ContextActivity()
    engine = Engine(cfg, "context", activity=activity)
    engine.executor = FakeExecutor(activity)

    def crash(exc: BaseException | None = None) -> None:  # outside a runtime: just raise
        raise exc if exc is not None else RuntimeError("crash")

    monkeypatch.setattr(engine, "crash", crash)
    plan = StepPlan(iteration=1, steps=[SequenceStep("a", 5)])
    engine.step(plan)
    assert engine.executor.seen == [(True, "decode")] and not activity.busy
    with pytest.raises(RuntimeError, match="fault"):
        engine.step(StepPlan(iteration=-1, steps=[SequenceStep("a", 5)]))
    assert not activity.busy  # a crashed plan does not pin the generation engine


def test_generation_engine_follows_the_placement(cfg, monkeypatch) -> None:
    activity = ContextActivity()
    part, whole = FakeStream("part"), FakeStream("whole")
    engine = Engine(cfg, "generation", placement=GenerationPlacement(part, whole, activity))
    engine.executor = FakeExecutor(activity)
    streams = []
    monkeypatch.setattr(
        engine, "_execute_on_stream", lambda plan, s: streams.append(s) or StepResult(0)
    )
    plan = StepPlan(iteration=1, steps=[SequenceStep("a", 1)])
    engine.step(plan)
    activity.begin()
    engine.step(plan)
    activity.end()
    engine.step(plan)
    assert [s.name for s in streams] == ["whole", "part", "whole"]
    assert engine.executor.graph_kind == WHOLE_GPU


# ------------------------------------------------------------------ overlapped steps


class LoggedStream(FakeStream):
    """A stand-in stream whose waits go to a shared log."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__(name)
        self.log = log

    def wait_stream(self, other: FakeStream) -> None:
        super().wait_stream(other)
        self.log.append(("wait", self.name, other.name))


class LaunchingExecutor:
    """Launches and finishes plans as ``PlanExecutor`` does, logging each on the stream that
    was current (``torch.cuda.stream`` stands in) and the graph kind it was launched with."""

    def __init__(self, log: list, current: list) -> None:
        self.log, self.current = log, current
        self.graph_kind = "decode"
        self.time_forwards = False
        self.forward_events = None
        self.sequences: dict = {}

    def _stream(self) -> str | None:
        return self.current[-1].name if self.current else None

    def launch(self, plan: StepPlan):
        if plan.iteration < 0:
            raise RuntimeError("fault in the forward")
        self.log.append(("launch", plan.iteration, self._stream(), self.graph_kind))
        return SimpleNamespace(plan=plan, forward_events=None, wait=lambda: None)

    def finish(self, launched) -> StepResult:
        self.log.append(("finish", launched.plan.iteration))
        return StepResult(iteration=launched.plan.iteration, flow=launched.plan.flow)

    def execute(self, plan: StepPlan) -> StepResult:
        self.log.append(("execute", plan.iteration, self._stream(), self.graph_kind))
        if plan.steps and plan.iteration < 0:
            raise RuntimeError("fault in the forward")
        return StepResult(iteration=plan.iteration, flow=plan.flow)


@pytest.fixture
def overlapped_generation(cfg, monkeypatch):
    """A generation engine on overlapped steps over stand-in streams: (engine, activity, log,
    replies). ``torch.cuda.stream(s)`` makes ``s`` current for the executor to log."""
    import contextlib

    import torch

    log: list = []
    current: list = []

    @contextlib.contextmanager
    def stream_context(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "stream", stream_context)
    activity = ContextActivity()
    part, whole = LoggedStream("part", log), LoggedStream("whole", log)
    engine = Engine(cfg, "generation", placement=GenerationPlacement(part, whole, activity))
    engine.executor = LaunchingExecutor(log, current)
    engine.overlap = True  # what on_start decides for this role
    replies: list[asyncio.Future] = []

    def take_reply() -> asyncio.Future:
        replies.append(asyncio.get_running_loop().create_future())
        return replies[-1]

    def crash(exc: BaseException | None = None) -> None:
        raise exc if exc is not None else RuntimeError("crash")

    monkeypatch.setattr(engine, "take_reply", take_reply)
    monkeypatch.setattr(engine, "crash", crash)
    return engine, activity, log, replies


def _plan(iteration: int) -> StepPlan:
    return StepPlan(iteration=iteration, steps=[SequenceStep("a", 1)], flow="generation")


async def test_overlapped_steps_launch_on_the_picked_stream_after_the_switch(
    overlapped_generation,
) -> None:
    """Two steps in flight across a stream switch: each launch runs on the stream the
    placement picked, with the graph kind picked for it, and a switched-to stream waits on the
    previous one before the launch that reads the previous step's tokens."""
    engine, activity, log, replies = overlapped_generation
    assert engine.step(_plan(1)) is None  # launched; its reply waits
    activity.begin()
    assert engine.step(_plan(2)) is None  # launched behind 1 (not finished yet), then 1
    activity.end()
    assert engine.step(_plan(3)) is None
    assert log == [
        ("launch", 1, "whole", WHOLE_GPU),
        ("wait", "part", "whole"),
        ("launch", 2, "part", PARTITION),
        ("finish", 1),
        ("wait", "whole", "part"),
        ("launch", 3, "whole", WHOLE_GPU),
        ("finish", 2),
    ]
    await asyncio.sleep(0)  # no plan came behind 3: it is finished on its own
    assert log[-1] == ("finish", 3)
    assert [r.result().iteration for r in replies] == [1, 2, 3]
    assert engine.profile.overlapped_steps == 3
    assert engine.placement.steps == {PARTITION: 1, WHOLE_GPU: 2}


async def test_overlapped_fallbacks_run_on_the_picked_stream(overlapped_generation) -> None:
    """A launch that fails settles the step in flight, then the isolation re-runs the plan
    on the same stream (a failure of the whole plan crashes the engine)."""
    engine, activity, log, replies = overlapped_generation
    engine.step(_plan(1))
    activity.begin()
    result = engine.step(_plan(-1))  # fails at launch; its one request fails alone
    assert result.failed and "a" in result.failed
    assert log[:4] == [
        ("launch", 1, "whole", WHOLE_GPU),
        ("wait", "part", "whole"),
        ("finish", 1),  # results stay in plan order
        ("execute", -1, "part", PARTITION),  # the plan-level part, on the partition
    ]
    assert all(e[2] == "part" for e in log[3:] if e[0] == "execute")
    assert replies[0].result().iteration == 1
    # a plan stepping the failed request: run plainly, on the stream picked for it
    activity.end()
    result = engine.step(_plan(4))
    assert result.failed == {"a": "this request failed in an earlier step"}
    assert log[-1] == ("execute", 4, "whole", WHOLE_GPU)
    assert ("wait", "whole", "part") in log
