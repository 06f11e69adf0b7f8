"""The head's rank bus: one ROUTER that node agents and rank workers connect to.

It lives as long as the node (rank groups come and go across restarts; agents stay
connected): it registers node agents (refusing a node rank given twice or a layout that
disagrees with the head's), pings them every second and drops one it has not heard from for
``AGENT_SILENCE_S``, and routes every rank message to the current group incarnation
(``listener``). Workers are addressed by their identity ``rank-<global rank>``.

With ``security`` (CURVE, the peer domain), an agent or worker whose public key is not listed
is refused during the handshake: nothing it sends reaches the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from greenroom.bus.codec import CodecError, decode, encode
from greenroom.bus.security import SocketSecurity, ZapHandler
from greenroom.bus.transport import Transport
from greenroom.logging import get_logger
from greenroom.parallel import messages as m
from greenroom.parallel.layout import RankLayout

log = get_logger(__name__)

PING_S = 1.0
AGENT_SILENCE_S = 5.0

Listener = Callable[[Any], None]


class RankHub:
    def __init__(
        self,
        transport: Transport,
        layout: RankLayout,
        bind: str,
        address: str | None = None,
        security: SocketSecurity | None = None,
        insecure: bool = False,
    ) -> None:
        """Bind ``bind``; ``address`` is where workers and agents connect (default: the
        bound address)."""
        self.layout = layout
        self.security = security
        self._zap = ZapHandler(transport.ctx, security) if security is not None else None
        try:
            self.channel = transport.bind_router(
                bind, self._on_frames, security=security, insecure=insecure
            )
        except BaseException:
            if self._zap is not None:
                self._zap.stop()
            raise
        self.address = address or self.channel.address
        self.listener: Listener | None = None
        self.agents: dict[int, bytes] = {}  # node rank -> identity
        self._heard: dict[int, float] = {}
        self._agents_changed = asyncio.Event()
        self._epoch = 0
        self._ping = asyncio.get_running_loop().create_task(self._ping_agents())

    def next_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    # ------------------------------------------------------------------ receive

    def _on_frames(self, frames: list) -> None:
        identity = bytes(frames[0].buffer)
        try:
            msg = decode(frames[1:])
        except CodecError as exc:
            log.warning("dropped undecodable rank-bus message", error=str(exc))
            return
        if isinstance(msg, m.AgentHello):
            self._register(identity, msg)
            return
        if isinstance(msg, m.Ping):
            node = self._node_of(identity)
            if node is not None:
                self._heard[node] = time.monotonic()
            return
        if self.listener is not None:
            self.listener(msg)

    def _node_of(self, identity: bytes) -> int | None:
        return next((n for n, i in self.agents.items() if i == identity), None)

    def _register(self, identity: bytes, hello: m.AgentHello) -> None:
        lay = self.layout
        reason = None
        if hello.nnodes != lay.nnodes or hello.world_size != lay.world_size:
            reason = (
                f"layout mismatch: this node says {hello.nnodes} nodes and {hello.world_size} "
                f"ranks, the head (node 0) says {lay.nnodes} nodes and {lay.world_size} ranks"
            )
        elif not 1 <= hello.node_rank < lay.nnodes:
            reason = f"node rank {hello.node_rank} is outside 1..{lay.nnodes - 1}"
        elif hello.node_rank in self.agents and self.agents[hello.node_rank] != identity:
            reason = f"node rank {hello.node_rank} is given twice (another node already has it)"
        if reason is not None:
            log.error("node agent refused", node_rank=hello.node_rank, reason=reason)
            self._send(identity, m.AgentRejected(reason=reason))
            return
        self.agents[hello.node_rank] = identity
        self._heard[hello.node_rank] = time.monotonic()
        self._agents_changed.set()
        log.info("node agent joined", node_rank=hello.node_rank, host=hello.host)
        self._send(identity, m.Ping())

    # ------------------------------------------------------------------ send

    def _send(self, identity: bytes, msg: Any) -> None:
        if not self.channel.closed:
            self.channel.try_send_to_peer([identity, *encode(msg)])

    def send_rank(self, rank: int, frames: list) -> bool:
        """Frames of an encoded message to one rank worker; False if its queue is full."""
        if self.channel.closed:
            return True  # the node is stopping: nothing will answer
        return self.channel.try_send_to_peer([f"rank-{rank}".encode(), *frames]) is not False

    async def send_rank_waiting(self, rank: int, frames: list) -> None:
        await self.channel.send([f"rank-{rank}".encode(), *frames])

    def send_agents(self, msg: Any) -> None:
        for identity in self.agents.values():
            self._send(identity, msg)

    # ------------------------------------------------------------------ agents

    async def wait_agents(self, timeout: float) -> None:
        """Until every other node's agent has joined (TimeoutError naming those missing)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.agents) < self.layout.nnodes - 1:
            self._agents_changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                missing = sorted(set(range(1, self.layout.nnodes)) - set(self.agents))
                raise TimeoutError(
                    f"node(s) {missing} did not join within {timeout:g} s "
                    "(run `greenroom launch` on each of them)"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._agents_changed.wait(), left)

    async def _ping_agents(self) -> None:
        while True:
            await asyncio.sleep(PING_S)
            now = time.monotonic()
            for node, identity in list(self.agents.items()):
                if now - self._heard.get(node, now) > AGENT_SILENCE_S:
                    log.error("node agent went silent", node_rank=node)
                    del self.agents[node]
                    if self.listener is not None:
                        self.listener(m.RankExited(epoch=self._epoch, rank=-1 - node, code=-1))
                    continue
                self._send(identity, m.Ping())

    def close(self) -> None:
        self._ping.cancel()
        self.send_agents(m.Shutdown())
        self.listener = None
        if not self.channel.closed:
            self.channel.close()
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
