"""A generation node's receive under a client abort, at every point of its life: the scheduler
core and the KV manager's sessions driven together, the engine's reports given by hand.

Each receive ends once (one TransferDone for the router, one final state in the sessions),
its blocks go back to the pool, and an abort after the read completed reports it complete."""

from __future__ import annotations

import pytest

from greenroom.actors.scheduling.budget import FlowBudget
from greenroom.actors.scheduling.core import SchedulerCore
from greenroom.bus.messages import (
    KVAdmit,
    KVAgentInfo,
    KVFree,
    KVStep,
    OutputBatch,
    SamplingParams,
    StepPlan,
    StepResult,
    SubmitRequest,
    TransferHandle,
    TransferUpdate,
)
from greenroom.config import KVConfig, KVTransferConfig, SchedulerConfig
from greenroom.kv import KVCacheManager
from greenroom.kv.transfer_sessions import TransferSessions, TransferState

TPB = 4
BLOCKS = 17
PROMPT = list(range(30, 43))  # 13 tokens: 4 blocks
AGENT = KVAgentInfo(
    agent_name="ctx",
    agent_metadata=b"md",
    pool_address=4096,
    block_bytes=64,
    pool_blocks=32,
    mem_type="DRAM",
    device_id=0,
    kv_layout="tiny",
)


def handle(rid: str) -> TransferHandle:
    """A context node's lease handle for ``PROMPT`` (first token 9)."""
    ctx = KVCacheManager(KVConfig(tokens_per_block=TPB, num_blocks=BLOCKS), BLOCKS)
    ctx.configure_transfer(KVTransferConfig(lease_s=30.0), AGENT)
    ctx.step(
        KVStep(iteration=1, admit=[KVAdmit(request_id=rid, token_ids=PROMPT, reserve_tokens=13)])
    )
    (h,) = ctx.step(KVStep(iteration=2, free=[KVFree(rid, [9], lease=True)])).handles
    return h


class GenerationSide:
    """A generation node's scheduler core and KV manager; plans go nowhere."""

    def __init__(self) -> None:
        self.core = SchedulerCore(SchedulerConfig(), TPB, 128, [0], [FlowBudget("mixed", 64, 8)])
        self.kv = KVCacheManager(KVConfig(tokens_per_block=TPB, num_blocks=BLOCKS), BLOCKS)
        self.kv.configure_transfer(KVTransferConfig(lease_s=30.0, lease_margin_s=0.5), None)
        self.done: list[tuple[str, str]] = []  # TransferDone (request id, state), in order

    def submit(self, rid: str = "a") -> None:
        sampling = SamplingParams(max_tokens=4, ignore_eos=True)
        self.core.submit(
            SubmitRequest(
                request_id=rid, prompt_token_ids=PROMPT, sampling=sampling, kv_handle=handle(rid)
            )
        )

    def kv_step(self) -> StepPlan | None:
        """One KVStep through the KV manager, and the plan it gives."""
        step = self.core.build_kv_step("mixed")
        assert step is not None
        return self.core.apply_kv_result("mixed", self.kv.step(step))

    def cancel(self, rid: str = "a") -> None:
        self.take(self.core.cancel([rid]))

    def result(self, plan: StepPlan, *updates: TransferUpdate) -> None:
        """The engine's result for ``plan`` (no tokens: every request in it waits for KV)."""
        self.take(
            self.core.apply_step_result(
                "mixed", StepResult(plan.iteration, transfers=list(updates))
            )
        )

    def take(self, out: OutputBatch | None) -> None:
        if out is not None:
            self.done += [(t.request_id, t.state) for t in out.transfers]

    def settle_kv(self) -> dict[str, int]:
        """Run KVSteps until the core has nothing left to tell the KV manager."""
        while self.core.has_work("mixed"):
            assert self.kv_step() is None
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == BLOCKS - 1, "blocks leaked"
        return self.kv.stats().transfers


def test_receive_sessions_open_pending_and_end_once() -> None:
    s = TransferSessions()
    s.expect("queued", None, 9.0)  # type: ignore[arg-type]
    assert s.receives["queued"].state is TransferState.PENDING
    assert s.settle_receive("queued", "cancelled")  # aborted before admission
    assert not s.settle_receive("queued", "cancelled")
    s.expect("read", None, 9.0)  # type: ignore[arg-type]
    s.receive("read", None, 5.0)  # type: ignore[arg-type]
    s.started("read")
    assert s.receives["read"].deadline == 5.0
    with pytest.raises(ValueError, match="already has a read"):
        s.receive("read", None, 5.0)  # type: ignore[arg-type]
    assert s.settle_receive("read", "complete")
    assert not s.settle_receive("read", "cancelled")  # an abort the engine saw too late
    assert s.counts() == {
        "receive_cancelled": 1,
        "receive_complete": 1,
        "leases_open": 0,
        "receives_open": 0,
    }


def test_abort_before_admission_cancels_the_pending_receive() -> None:
    """The interleaving that went uncounted: the abort reaches the generation node while the
    request waits for admission; no KVStep has named it yet."""
    g = GenerationSide()
    g.submit()
    g.cancel()
    assert g.done == [("a", "cancelled")]  # the router releases the context node's lease
    g.submit()  # the id again at once: its receive opens after the first one ended
    plan = g.kv_step()
    assert [r.request_id for r in plan.receives] == ["a"]
    g.result(plan, TransferUpdate("a", "complete"))
    g.cancel()
    assert g.done == [("a", "cancelled"), ("a", "complete")]
    assert g.settle_kv() == {
        "receive_cancelled": 1,
        "receive_complete": 1,
        "leases_open": 0,
        "receives_open": 0,
    }


def test_abort_while_the_admitting_kv_step_is_out_starts_no_read() -> None:
    g = GenerationSide()
    g.submit()
    step = g.core.build_kv_step("mixed")
    result = g.kv.step(step)
    assert [r.request_id for r in result.receives] == ["a"]
    g.cancel()  # the KV manager admitted it; the core has not heard yet
    plan = g.core.apply_kv_result("mixed", result)
    assert plan is None or not plan.receives
    assert g.done == [("a", "cancelled")]
    assert g.settle_kv() == {"receive_cancelled": 1, "leases_open": 0, "receives_open": 0}


def test_abort_while_the_read_is_open_cancels_it_on_the_engine() -> None:
    g = GenerationSide()
    g.submit()
    first = g.kv_step()
    assert [r.request_id for r in first.receives] == ["a"]
    g.cancel()
    assert g.done == []  # the blocks stay until the engine confirms the read is off
    second = g.kv_step()
    assert second.cancel_receives == ["a"]
    g.result(first)
    g.result(second, TransferUpdate("a", "cancelled", "cancelled before it started"))
    assert g.done == [("a", "cancelled")]
    assert g.settle_kv() == {"receive_cancelled": 1, "leases_open": 0, "receives_open": 0}


def test_abort_after_the_read_completed_on_the_engine_reports_complete() -> None:
    g = GenerationSide()
    g.submit()
    first = g.kv_step()
    g.cancel()  # the engine finished the read while the abort was on its way
    second = g.kv_step()
    g.result(first, TransferUpdate("a", "complete"))
    g.result(second, TransferUpdate("a", "cancelled", "no read in progress"))
    assert g.done == [("a", "complete")]
    assert g.settle_kv() == {"receive_complete": 1, "leases_open": 0, "receives_open": 0}


class _Outbox:
    def __init__(self) -> None:
        self.batches: list[OutputBatch] = []

    async def tell(self, msg: OutputBatch) -> None:
        self.batches.append(msg)


async def test_a_receiver_the_scheduler_refuses_hears_its_read_will_not_happen() -> None:
    """Refused before the core (here: the node drains): the router still gets a TransferDone,
    so it releases the context node's lease at once instead of at the lease's deadline."""
    from greenroom.actors.scheduler import Scheduler
    from greenroom.bus.messages import EngineInfo
    from greenroom.config import build_config

    info = EngineInfo(
        num_blocks=BLOCKS,
        tokens_per_block=TPB,
        max_model_len=128,
        vocab_size=500,
        eos_token_ids=[0],
        device="cpu",
        model_name="tiny",
    )
    outbox = _Outbox()
    sched = Scheduler(build_config({"role": "generation"}), info, None, {}, outbox)  # type: ignore[arg-type]
    sched._draining = True
    sampling = SamplingParams(max_tokens=4)
    await sched.submit(
        SubmitRequest(
            request_id="a", prompt_token_ids=PROMPT, sampling=sampling, kv_handle=handle("a")
        )
    )
    (batch,) = outbox.batches
    assert [(t.request_id, t.state) for t in batch.transfers] == [("a", "error")]
    assert [e.kind for e in batch.errors] == ["failed"]
