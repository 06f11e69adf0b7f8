"""KV transfer pieces without nodes: descriptor runs, the session state machine, the KV
manager's leases and receives, router pairing, and one real NIXL read between two pools."""

from __future__ import annotations

import time

import pytest
import torch

from greenroom.actors.router import NodeLink, pick_least_loaded
from greenroom.bus.messages import (
    KVAdmit,
    KVAgentInfo,
    KVFree,
    KVReceive,
    KVStep,
    ServerInfo,
    TransferUpdate,
)
from greenroom.config import ConfigError, KVConfig, KVTransferConfig
from greenroom.kv import KVCacheManager
from greenroom.kv.transfer import KVTransferAgent, block_runs
from greenroom.kv.transfer_sessions import TransferSessions, TransferState
from greenroom.router import check_pairing

TPB = 4
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


def test_block_runs_merge_blocks_consecutive_on_both_sides() -> None:
    assert block_runs([5, 6, 7, 9], [1, 2, 3, 4]) == [(5, 1, 3), (9, 4, 1)]
    assert block_runs([5, 6], [2, 1]) == [(5, 2, 1), (6, 1, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError):
        block_runs([1], [])


def test_session_states_only_move_forward() -> None:
    s = TransferSessions()
    s.receive("r", handle=None, deadline=0.0)  # type: ignore[arg-type]
    s.started("r")
    assert s.receives["r"].state is TransferState.IN_PROGRESS
    assert s.settle_receive("r", "complete") and not s.settle_receive("r", "error")
    with pytest.raises(ValueError):
        s.receive("r2", None, 0.0).move(TransferState.PENDING)  # type: ignore[arg-type]
    assert s.counts()["receive_complete"] == 1


def manager(agent: KVAgentInfo | None = AGENT, lease_s: float = 5.0) -> KVCacheManager:
    m = KVCacheManager(KVConfig(tokens_per_block=TPB, num_blocks=17), 17)
    m.configure_transfer(KVTransferConfig(lease_s=lease_s, lease_margin_s=0.5), agent)
    return m


def prefill(m: KVCacheManager, rid: str, prompt: list[int]) -> None:
    m.step(
        KVStep(
            iteration=1,
            admit=[KVAdmit(request_id=rid, token_ids=prompt, reserve_tokens=len(prompt))],
        )
    )


def test_context_side_lease_holds_blocks_until_released_or_expired() -> None:
    m = manager()
    prompt = list(range(10, 20))  # 10 tokens: 3 blocks
    prefill(m, "a", prompt)
    result = m.step(KVStep(iteration=2, free=[KVFree("a", [7], lease=True)]))
    (h,) = result.handles
    assert (h.num_tokens, h.first_token, len(h.block_ids), h.agent_name) == (10, 7, 3, "ctx")
    assert m.stats().leased_blocks == 3 and m.num_free_blocks == 16 - 3
    assert m.end_lease("a", "complete") and not m.end_lease("a", "complete")
    assert m.num_free_blocks == 16
    prefill(m, "b", prompt)
    m.step(KVStep(iteration=3, free=[KVFree("b", [7], lease=True)]))
    assert m.sweep_leases(time.time()) == 0
    assert m.sweep_leases(time.time() + 10) == 1
    assert m.num_free_blocks == 16
    assert m.stats().transfers["lease_timed_out"] == 1
    m.check_invariants()


def test_generation_side_reads_only_blocks_its_prefix_cache_lacks() -> None:
    ctx = manager()
    prompt = list(range(30, 43))  # 13 tokens: 4 blocks
    prefill(ctx, "a", prompt)
    (h,) = ctx.step(KVStep(iteration=2, free=[KVFree("a", [9], lease=True)])).handles
    gen = manager(agent=None)
    seq = prompt + [9]
    r1 = gen.step(
        KVStep(
            iteration=1,
            admit=[KVAdmit(request_id="a", token_ids=seq, reserve_tokens=14, receive=h)],
        )
    )
    (recv,) = r1.receives
    assert recv.remote_blocks == h.block_ids and len(recv.local_blocks) == 4
    assert recv.deadline <= h.lease_deadline - 0.5
    gen.step(
        KVStep(iteration=2, transfers=[TransferUpdate("a", "complete")], free=[KVFree("a", [11])])
    )
    r2 = gen.step(
        KVStep(
            iteration=3,
            admit=[KVAdmit(request_id="b", token_ids=seq, reserve_tokens=14, receive=h)],
        )
    )
    (recv2,) = r2.receives
    assert recv2.remote_blocks == h.block_ids[3:]  # three full blocks were cached here
    assert gen.stats().transfers["receive_complete"] == 1


def info(role: str, tp: int = 1, layout: str = "tiny") -> ServerInfo:
    return ServerInfo(
        request_id="",
        model_name="m",
        max_model_len=64,
        vocab_size=10,
        num_blocks=8,
        tokens_per_block=16,
        device="cpu",
        role=role,
        tp_size=tp,
        kv_layout=layout,
    )


def link(role: str, info_: ServerInfo, load: int = 0) -> NodeLink:
    return NodeLink(f"tcp://127.0.0.1:{load + 1}", role, client=None, info=info_, load=load)  # type: ignore[arg-type]


def test_pairing_refuses_tp_mismatch_and_wrong_roles() -> None:
    check_pairing([link("context", info("context"))], [link("generation", info("generation"))])
    with pytest.raises(ConfigError, match="tp_size mismatch"):
        check_pairing(
            [link("context", info("context"))], [link("generation", info("generation", tp=2))]
        )
    with pytest.raises(ConfigError, match="serves role 'mixed'"):
        check_pairing([link("context", info("mixed"))], [link("generation", info("generation"))])
    with pytest.raises(ConfigError, match="KV mismatch"):
        check_pairing(
            [link("context", info("context"))], [link("generation", info("generation", layout="x"))]
        )


def test_least_loaded_live_node_is_picked() -> None:
    a, b, c = (link("context", info("context"), load) for load in (3, 1, 0))
    c.alive = False
    assert pick_least_loaded([a, b, c]) is b
    assert pick_least_loaded([c]) is None


def test_nixl_reads_merged_runs_between_two_pools() -> None:
    src = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    dst = torch.zeros_like(src)
    sender, receiver = KVTransferAgent(src, "t"), KVTransferAgent(dst, "t")
    try:
        h = sender.info().handle(
            "r",
            [3, 4, 5, 9],
            num_tokens=4,
            first_token=0,
            tokens_per_block=1,
            tp_size=1,
            lease_deadline=time.time() + 5,
        )

        def read(rid: str) -> KVReceive:
            return KVReceive(
                request_id=rid,
                handle=h,
                remote_blocks=[3, 4, 5, 9],
                local_blocks=[1, 2, 3, 7],
                deadline=time.time() + 5,
            )

        # a held read is cancelled without starting; lifting the hold starts the others
        receiver.hold_until = time.time() + 60
        receiver.start(read("held"))
        receiver.start(read("r"))
        assert receiver.poll() == [] and receiver.pending == 2
        receiver.cancel("held")
        assert receiver.poll() == [
            TransferUpdate("held", "cancelled", "cancelled before it started")
        ]
        receiver.hold_until = 0.0
        receiver.wait(["r"], time.time() + 5)
        assert receiver.poll() == [TransferUpdate("r", "complete")]
        assert torch.equal(dst[1:4], src[3:6]) and torch.equal(dst[7], src[9])
        assert dst[4:7].abs().sum() == 0 and dst[8:].abs().sum() == 0
    finally:
        receiver.close()
        sender.close()
