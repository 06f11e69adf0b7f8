"""Supervisor: one_for_one restarts into the same ref, intensity limit, escalation."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from greenroom.actors import (
    Actor,
    ActorCrash,
    ActorCrashed,
    ActorStopped,
    AskTimeout,
    Runtime,
    Supervisor,
    handles,
)
from greenroom.bus.messages import Message

sys.path.insert(0, str(Path(__file__).parent))


class SvPing(Message):
    pass


class SvCrash(Message):
    pass


class SvHang(Message):
    pass


class Worker(Actor):
    """Counts incarnations through a shared list (local hosts only)."""

    def __init__(self, starts: list[int] | None = None) -> None:
        self.starts = starts if starts is not None else []

    async def on_start(self) -> None:
        self.starts.append(len(self.starts))

    @handles(SvPing)
    def ping(self, msg: SvPing) -> SvPing:
        return SvPing()

    @handles(SvCrash)
    def crash_now(self, msg: SvCrash) -> None:
        raise ActorCrash("crash requested")

    @handles(SvHang)
    async def hang(self, msg: SvHang) -> None:
        await asyncio.sleep(3600)


async def eventually_ok(ref, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            assert await ref.ask(SvPing(), timeout=0.5) == SvPing()
            return
        except (ActorCrashed, ActorStopped, AskTimeout):  # over a socket, a restart may drop one
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("host", ["loop", "thread"])
async def test_crashed_child_restarts_into_the_same_ref(host: str) -> None:
    rt = Runtime()
    try:
        starts: list[int] = []
        sup = Supervisor(rt, max_restarts=3, period_s=10.0)
        ref = await sup.start_child(Worker, starts, name="worker", host=host)
        hanging = asyncio.create_task(ref.ask(SvHang(), timeout=10.0))
        await asyncio.sleep(0.02)
        rt.cell("worker").actor.crash(RuntimeError("injected"))
        with pytest.raises(ActorCrashed):  # the pending ask fails, it does not hang
            await asyncio.wait_for(hanging, 2.0)
        await eventually_ok(ref)
        assert starts == [0, 1]
        assert sup.restarts == 1
        with pytest.raises(ActorCrashed):
            await ref.ask(SvCrash(), timeout=2.0)
        await eventually_ok(ref)
        assert starts == [0, 1, 2]
    finally:
        await rt.shutdown(timeout=5.0)


async def test_process_child_restarts_and_keeps_its_exposed_ref() -> None:
    rt = Runtime()
    try:
        sup = Supervisor(rt, max_restarts=2, period_s=30.0)
        ref = await sup.start_child("test_actor_supervisor:Worker", name="pworker", host="process")
        first_pid = rt.cell("pworker").pid
        with pytest.raises(ActorCrashed):
            await ref.ask(SvCrash(), timeout=5.0)
        await eventually_ok(ref, timeout=20.0)
        assert rt.cell("pworker").pid != first_pid
        assert sup.restarts == 1
    finally:
        await rt.shutdown(timeout=5.0)


async def test_exposed_child_is_served_again_after_a_restart(tmp_path) -> None:
    rt = Runtime()
    try:
        sup = Supervisor(rt, max_restarts=2, period_s=30.0)
        ref = await sup.start_child(Worker, name="served", host="thread")
        remote = await rt.connect(await rt.expose(ref, f"ipc://{tmp_path}/served.sock"))
        assert await remote.ask(SvPing(), timeout=2.0) == SvPing()
        with pytest.raises(ActorCrashed):
            await remote.ask(SvCrash(), timeout=2.0)
        await eventually_ok(remote)
    finally:
        await rt.shutdown(timeout=5.0)


async def test_crashes_past_the_intensity_limit_escalate() -> None:
    rt = Runtime()
    escalations: list[BaseException] = []
    shutdown_done = asyncio.Event()

    async def on_escalate(reason: BaseException) -> None:
        escalations.append(reason)
        await rt.shutdown(timeout=5.0)
        shutdown_done.set()

    sup = Supervisor(rt, max_restarts=2, period_s=10.0, on_escalate=on_escalate)
    starts: list[int] = []
    flaky = await sup.start_child(Worker, starts, name="flaky")
    steady = await sup.start_child(Worker, name="steady", host="thread")
    for _ in range(3):
        await eventually_ok(flaky)
        with pytest.raises(ActorCrashed):
            await flaky.ask(SvCrash(), timeout=2.0)
    await asyncio.wait_for(shutdown_done.wait(), 10.0)
    assert len(escalations) == 1 and "flaky" in str(escalations[0])
    assert starts == [0, 1, 2]  # two restarts, then escalation instead of a third
    assert sup.escalated and rt.closed
    with pytest.raises((ActorStopped, ActorCrashed)):
        await steady.ask(SvPing(), timeout=1.0)


async def test_crashes_spread_out_beyond_the_period_do_not_escalate() -> None:
    rt = Runtime()
    try:
        sup = Supervisor(rt, max_restarts=1, period_s=0.2)
        ref = await sup.start_child(Worker, name="rare")
        for _ in range(3):
            await eventually_ok(ref)
            with pytest.raises(ActorCrashed):
                await ref.ask(SvCrash(), timeout=2.0)
            await asyncio.sleep(0.3)
        await eventually_ok(ref)
        assert not sup.escalated and sup.restarts == 3
    finally:
        await rt.shutdown(timeout=5.0)


async def test_a_normal_stop_is_not_restarted() -> None:
    rt = Runtime()
    try:
        starts: list[int] = []
        sup = Supervisor(rt, max_restarts=3, period_s=10.0)
        ref = await sup.start_child(Worker, starts, name="done")
        await rt.stop(ref)
        await asyncio.sleep(0.05)
        assert starts == [0] and sup.restarts == 0
        with pytest.raises(ActorStopped):
            await ref.ask(SvPing(), timeout=1.0)
    finally:
        await rt.shutdown(timeout=5.0)
