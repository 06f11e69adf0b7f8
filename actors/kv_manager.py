"""KV-manager actor: owns block state (pool, prefix tree, host tier) behind one batch message.

The scheduler sends one `KVStep` per iteration and per flow; the answer says which requests got
which blocks, how much of each prompt was reused, and which host-tier copies the engine must run
first. Block events go out on an optional PUB socket for a router to consume.
"""

from __future__ import annotations

import msgspec
import zmq
import zmq.asyncio

from greenroom.actors.core import Actor, handles
from greenroom.bus.messages import KVEvent, KVStats, KVStatsQuery, KVStep, KVStepResult
from greenroom.config import KVConfig


class KVManager(Actor):
    mailbox_size = 64

    def __init__(self, cfg: KVConfig, num_gpu_blocks: int, events_address: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_gpu_blocks = num_gpu_blocks
        self.events_address = events_address
        self._pub: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self.manager = None

    async def on_start(self) -> None:
        from greenroom.kv import KVCacheManager

        sink = None
        if self.events_address:
            self._ctx = zmq.asyncio.Context()
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, 10_000)
            self._pub.bind(self.events_address)
            sink = self._publish
        self.manager = KVCacheManager(self.cfg, self.num_gpu_blocks, event_sink=sink)

    async def on_stop(self) -> None:
        if self._pub is not None:
            self._pub.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def _publish(self, event: KVEvent) -> None:
        try:
            self._pub.send(self._encoder.encode(event), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # a slow subscriber loses events; the KV manager never waits for one

    @handles(KVStep)
    async def step(self, msg: KVStep) -> KVStepResult:
        return self.manager.step(msg)

    @handles(KVStatsQuery)
    async def stats(self, _: KVStatsQuery) -> KVStats:
        return self.manager.stats()
