"""KV-manager actor: owns block state (pool, prefix tree, host tier) behind one batch message.

The scheduler sends one `KVStep` per iteration and per flow; the answer says which requests got
which blocks, how much of each prompt was reused, and which host-tier copies the engine must run
first. Block events go out on an optional PUB socket for a router to consume.
"""

from __future__ import annotations

import asyncio

import msgspec
import zmq

from greenroom.actors import Actor, handles
from greenroom.bus.messages import (
    KVAgentChanged,
    KVAgentInfo,
    KVEvent,
    KVLeaseRelease,
    KVLeaseSweep,
    KVStats,
    KVStatsQuery,
    KVStep,
    KVStepResult,
)
from greenroom.bus.transport import Channel
from greenroom.config import KVConfig, KVTransferConfig

LEASE_SWEEP_S = 0.1


class KVManager(Actor):
    mailbox_size = 64

    def __init__(
        self,
        cfg: KVConfig,
        num_gpu_blocks: int,
        events_address: str | None = None,
        transfer_cfg: KVTransferConfig | None = None,
        agent: KVAgentInfo | None = None,
        tp_size: int = 1,
        cp_size: int = 1,
    ):
        """Context role: ``agent`` is the engine's NIXL agent, named by every lease handle."""
        super().__init__()
        self.transfer_cfg = transfer_cfg or KVTransferConfig()
        self.agent = agent
        self.tp_size = tp_size
        self.cp_size = cp_size  # Helix: num_gpu_blocks spans cp_size ranks' pools
        self.cfg = cfg
        self.num_gpu_blocks = num_gpu_blocks
        self.events_address = events_address
        self._pub: Channel | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self.manager = None

    async def on_start(self) -> None:
        from greenroom.kv import KVCacheManager

        sink = None
        if self.events_address:
            self._pub = self.runtime.transport().bind(zmq.PUB, self.events_address)
            sink = self._publish
        self.manager = KVCacheManager(
            self.cfg, self.num_gpu_blocks, event_sink=sink, cp_size=self.cp_size
        )
        self.manager.configure_transfer(self.transfer_cfg, self.agent, self.tp_size)
        if self.agent is not None:
            self.spawn_task(self._lease_timer(), name="lease-timer")

    async def _lease_timer(self) -> None:
        """Leases end on their own deadline even when no receiver ever answers."""
        while True:
            await asyncio.sleep(LEASE_SWEEP_S)
            if self.manager.transfers.leases:
                await self.ref.tell(KVLeaseSweep())

    async def on_stop(self) -> None:
        if self._pub is not None:
            self._pub.close()

    def _publish(self, event: KVEvent) -> None:
        # a slow subscriber loses events (PUB drops at its high-water mark); never wait for one
        self._pub.try_send([self._encoder.encode(event)])

    @handles(KVStep)
    async def step(self, msg: KVStep) -> KVStepResult:
        return self.manager.step(msg)

    @handles(KVLeaseRelease)
    def release_lease(self, msg: KVLeaseRelease) -> bool:
        return self.manager.end_lease(msg.request_id, msg.outcome)

    @handles(KVAgentChanged)
    def agent_changed(self, msg: KVAgentChanged) -> None:
        if self.manager.agent is not None:
            self.manager.agent = msg.agent

    @handles(KVLeaseSweep)
    def sweep(self, _: KVLeaseSweep) -> int:
        return self.manager.sweep_leases()

    @handles(KVStatsQuery)
    async def stats(self, _: KVStatsQuery) -> KVStats:
        return self.manager.stats()
