"""The node agent: what `greenroom launch` runs on every node but node 0.

It joins the head's rank bus, starts this node's rank workers whenever the head opens an
epoch (StartRanks) and kills them when it closes one (StopRanks), reports every worker exit,
and pings the head each second. It exits 0 when the head shuts the deployment down, 2 when the
head refuses it (a node rank given twice, a layout that disagrees), and 1 when it cannot reach
the head within ``parallel.connect_timeout_s`` or hears nothing from it for as long.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import msgspec

from greenroom.bus.codec import CodecError, decode, encode
from greenroom.bus.transport import Transport, new_context
from greenroom.config import NodeConfig
from greenroom.logging import get_logger
from greenroom.node_security import peer_client_keys
from greenroom.parallel import messages as m
from greenroom.parallel.group_engine import layout_of
from greenroom.parallel.hub import PING_S
from greenroom.parallel.local_ranks import LocalRanks
from greenroom.parallel.worker import WorkerSpec

log = get_logger(__name__)

EXIT_REFUSED = 2
EXIT_LOST = 1


def _say(line: str) -> None:
    print(f"greenroom: {line}", file=sys.stderr, flush=True)


async def run_agent(cfg: NodeConfig) -> int:
    p = cfg.parallel
    layout = layout_of(cfg)
    address = f"tcp://{p.master_addr}:{p.master_port + 1}"
    keys = peer_client_keys(cfg, address)
    ctx = new_context()
    transport = Transport(ctx)
    inbox: asyncio.Queue = asyncio.Queue()

    def on_frames(frames) -> None:
        try:
            inbox.put_nowait(decode(frames))
        except CodecError as exc:
            log.warning("dropped undecodable message from the head", error=str(exc))

    channel = transport.connect_dealer(address, on_frames, keys)
    bus_keys = None if keys is None else (keys.server_public_key, keys.public_key, keys.secret_key)
    local = LocalRanks(
        lambda epoch, rank, code: channel.try_send(
            encode(m.RankExited(epoch=epoch, rank=rank, code=code))
        )
    )
    hello = m.AgentHello(
        node_rank=p.node_rank,
        nnodes=p.nnodes,
        world_size=layout.world_size,
        host=socket.gethostname(),
    )
    await channel.send(encode(hello))

    async def ping() -> None:
        while True:
            await asyncio.sleep(PING_S)
            channel.try_send(encode(m.Ping()))

    pinger = asyncio.get_running_loop().create_task(ping())
    joined = False
    try:
        while True:
            wait = p.connect_timeout_s
            try:
                msg = await asyncio.wait_for(inbox.get(), wait)
            except TimeoutError:
                if not joined:
                    _say(
                        f"error: cannot reach the head (node 0) at {address} within {wait:g} s: "
                        "is node 0 running, and --master-addr/--master-port right?"
                        + (
                            " (with CURVE: does node 0 list this node's public key in "
                            "--curve-peer-keys, and this node node 0's?)"
                            if keys is not None
                            else ""
                        )
                    )
                else:
                    _say(f"error: the head at {address} went silent for {wait:g} s; stopping")
                return EXIT_LOST
            if not joined:
                joined = True
                print(f"greenroom: node {p.node_rank} joined the head at {address}", flush=True)
            if isinstance(msg, m.AgentRejected):
                _say(f"error: the head refused this node: {msg.reason}")
                return EXIT_REFUSED
            if isinstance(msg, m.StartRanks):
                spec = msgspec.msgpack.decode(msg.worker_spec, type=WorkerSpec)
                spec = msgspec.structs.replace(spec, bus_keys=bus_keys)
                local.start(spec, layout.ranks_on_node(p.node_rank))
            elif isinstance(msg, m.StopRanks):
                if msg.epoch == local.epoch:
                    local.kill_all()
            elif isinstance(msg, m.Shutdown):
                print(f"greenroom: node {p.node_rank} stopped ({msg.reason})", flush=True)
                return 0
    finally:
        pinger.cancel()
        await local.stop_all(grace_s=1.0)
        transport.close()
        ctx.term()
