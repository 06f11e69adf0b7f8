"""Actor core: ordering, ask/tell semantics, errors, hooks, backpressure, threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from greenroom.actors import (
    Actor,
    ActorCrash,
    ActorCrashed,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    RemoteError,
    Runtime,
    handles,
)
from greenroom.bus.messages import Message


class Add(Message):
    value: int


class Total(Message):
    pass


class Sleep(Message):
    seconds: float


class Fail(Message):
    text: str


class Die(Message):
    pass


class Unknown(Message):
    pass


class Gate(Message):
    pass


class Counter(Actor):
    mailbox_size = 4

    def __init__(self, events: list[str] | None = None) -> None:
        self.seen: list[int] = []
        self.events = events if events is not None else []
        self.gate: asyncio.Event | None = None
        self.thread = ""

    async def on_start(self) -> None:
        self.events.append("start")
        self.gate = asyncio.Event()
        self.thread = threading.current_thread().name

    async def on_stop(self) -> None:
        self.events.append("stop")

    @handles(Add)
    def add(self, msg: Add) -> None:
        self.seen.append(msg.value)

    @handles(Total)
    def total(self, msg: Total) -> Add:
        return Add(value=sum(self.seen))

    @handles(Sleep)
    async def sleep(self, msg: Sleep) -> None:
        await asyncio.sleep(msg.seconds)

    @handles(Gate)
    async def wait_gate(self, msg: Gate) -> None:
        await self.gate.wait()

    @handles(Fail)
    async def fail(self, msg: Fail) -> None:
        raise KeyError(msg.text)

    @handles(Die)
    def die(self, msg: Die) -> None:
        raise ActorCrash("told to die")


@pytest.fixture
async def rt():
    runtime = Runtime()
    yield runtime
    await runtime.shutdown(timeout=5.0)


async def test_messages_are_handled_in_order(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="counter", mailbox_size=1000)
    for i in range(500):
        await ref.tell(Add(value=i))
    assert await ref.ask(Total(), timeout=2.0) == Add(value=sum(range(500)))
    assert rt.cell("counter").actor.seen == list(range(500))


async def test_hooks_run_once_each(rt: Runtime) -> None:
    events: list[str] = []
    ref = await rt.spawn(Counter, events, name="hooks")
    assert events == ["start"]
    await ref.tell(Add(value=1))
    await rt.stop(ref)
    assert events == ["start", "stop"]


async def test_ask_timeout(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="slow")
    with pytest.raises(AskTimeout):
        await ref.ask(Sleep(seconds=0.5), timeout=0.05)
    # The actor is still fine afterwards.
    assert await ref.ask(Total(), timeout=2.0) == Add(value=0)


async def test_handler_exception_is_a_typed_remote_error_and_the_actor_survives(rt):
    ref = await rt.spawn(Counter, name="faulty")
    with pytest.raises(RemoteError) as info:
        await ref.ask(Fail(text="boom"), timeout=1.0)
    assert info.value.type_name == "KeyError"
    assert "boom" in info.value.message
    await ref.tell(Fail(text="logged, not fatal"))
    with pytest.raises(RemoteError, match="TypeError.*no handler for Unknown"):
        await ref.ask(Unknown(), timeout=1.0)
    assert await ref.ask(Total(), timeout=1.0) == Add(value=0)


async def test_ask_to_a_stopped_actor_fails_fast(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="stopped")
    await rt.stop(ref)
    with pytest.raises(ActorStopped):
        await ref.ask(Total(), timeout=5.0)
    with pytest.raises(ActorStopped):
        await ref.tell(Add(value=1))


async def test_queued_asks_fail_with_stopped_when_the_actor_stops(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="queue")
    busy = asyncio.create_task(ref.ask(Sleep(seconds=0.2), timeout=5.0))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(ref.ask(Total(), timeout=5.0))
    await asyncio.sleep(0.01)
    await rt.stop(ref)
    assert await busy is None  # the message in hand finishes
    with pytest.raises(ActorStopped):
        await queued


async def test_crash_fails_the_pending_and_queued_asks(rt: Runtime) -> None:
    events: list[str] = []
    ref = await rt.spawn(Counter, events, name="crashy")
    blocked = asyncio.create_task(ref.ask(Gate(), timeout=5.0))
    queued = asyncio.create_task(ref.ask(Total(), timeout=5.0))
    await asyncio.sleep(0.01)
    rt.cell("crashy").actor.crash(RuntimeError("from outside the handler"))
    with pytest.raises(ActorCrashed):
        await blocked
    with pytest.raises(ActorCrashed):
        await queued
    with pytest.raises(ActorCrashed):
        await ref.ask(Total(), timeout=5.0)
    assert events == ["start", "stop"]


async def test_actor_crash_raised_by_a_handler_crashes_the_actor(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="die")
    with pytest.raises(ActorCrashed, match="told to die"):
        await ref.ask(Die(), timeout=5.0)
    with pytest.raises(ActorCrashed):
        await ref.tell(Add(value=1))


class Failing(Actor):
    async def on_start(self) -> None:
        raise OSError("no device")


async def test_on_start_failure_fails_spawn(rt: Runtime) -> None:
    with pytest.raises(ActorCrashed, match="no device"):
        await rt.spawn(Failing, name="failing")


class Background(Actor):
    async def on_start(self) -> None:
        self.spawn_task(self._work())

    async def _work(self) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("background task failed")


async def test_failing_background_task_crashes_the_actor(rt: Runtime) -> None:
    await rt.spawn(Background, name="bg")
    cell = rt.cell("bg")
    await asyncio.wait_for(cell.wait_exit(), 2.0)
    assert cell.state.value == "crashed"


async def test_bounded_mailbox_applies_backpressure(rt: Runtime) -> None:
    ref = await rt.spawn(Counter, name="bounded", mailbox_size=2)
    await ref.tell(Gate())  # taken by the actor, which now waits
    await asyncio.sleep(0.01)
    ref.tell_nowait(Add(value=1))
    ref.tell_nowait(Add(value=2))
    with pytest.raises(MailboxFull):
        ref.tell_nowait(Add(value=3))
    blocked = asyncio.create_task(ref.tell(Add(value=3)))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # waits for room
    rt.cell("bounded").actor.gate.set()
    await asyncio.wait_for(blocked, 1.0)
    assert await ref.ask(Total(), timeout=1.0) == Add(value=6)


class Forwarder(Actor):
    """Lives in a thread; tells an actor on the main loop."""

    def __init__(self, target) -> None:
        self.target = target

    @handles(Add)
    async def forward(self, msg: Add) -> Add:
        await self.target.tell(msg)
        total = await self.target.ask(Total(), timeout=2.0)
        return Add(value=total.value)


async def test_thread_actor_talks_to_a_main_loop_actor(rt: Runtime) -> None:
    counter = await rt.spawn(Counter, name="main-counter", mailbox_size=64)
    forwarder = await rt.spawn(Forwarder, counter, name="forwarder", host="thread")
    assert rt.cell("forwarder").loop is not asyncio.get_running_loop()
    results = [await forwarder.ask(Add(value=i), timeout=2.0) for i in range(1, 6)]
    assert results == [Add(value=v) for v in (1, 3, 6, 10, 15)]


async def test_thread_actor_runs_on_its_own_thread_and_backpressure_crosses_threads(rt):
    ref = await rt.spawn(Counter, name="threaded", host="thread", mailbox_size=2)
    actor = rt.cell("threaded").actor
    assert actor.thread.startswith("greenroom:threaded")
    await ref.tell(Gate())
    await asyncio.sleep(0.02)
    await ref.tell(Add(value=1))
    await ref.tell(Add(value=2))
    blocked = asyncio.create_task(ref.tell(Add(value=3)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    rt.cell("threaded").loop.call_soon_threadsafe(actor.gate.set)
    await asyncio.wait_for(blocked, 1.0)
    assert await ref.ask(Total(), timeout=1.0) == Add(value=6)


async def test_duplicate_names_are_refused(rt: Runtime) -> None:
    await rt.spawn(Counter, name="same")
    with pytest.raises(ValueError, match="already running"):
        await rt.spawn(Counter, name="same")


class Later(Actor):
    """Answers each Add later, in reverse order, from outside the handler (take_reply)."""

    def __init__(self) -> None:
        self.replies: list = []

    @handles(Add)
    def add(self, msg: Add) -> None:
        self.replies.append((self.take_reply(), msg.value))

    @handles(Total)
    def flush(self, _: Total) -> int:
        from greenroom.actors.cell import settle

        for reply, value in reversed(self.replies):
            settle(reply, value * 10)
        n, self.replies = len(self.replies), []
        return n


async def test_a_taken_reply_is_answered_later_while_other_messages_are_handled(rt) -> None:
    ref = await rt.spawn(Later, name="later")
    first = asyncio.ensure_future(ref.ask(Add(value=1), timeout=5))
    second = asyncio.ensure_future(ref.ask(Add(value=2), timeout=5))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    assert await ref.ask(Total(), timeout=5) == 2
    assert await first == 10 and await second == 20
