"""Where the SM-disaggregation generation engine decodes: its partition while the context
engine runs a plan, the whole GPU while it idles (CPU: stand-in streams and executors)."""

from __future__ import annotations

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
