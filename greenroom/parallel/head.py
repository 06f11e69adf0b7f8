"""Node 0's side of a multi-rank node: the rendezvous store, the rank bus, the group engine."""

from __future__ import annotations

from datetime import timedelta

from greenroom.actors import ActorRef, Supervisor
from greenroom.bus.security import SocketSecurity, is_loopback
from greenroom.config import NodeConfig
from greenroom.logging import get_logger
from greenroom.node_security import peer_socket_security
from greenroom.parallel.group_engine import RankGroupEngine, layout_of
from greenroom.parallel.hub import RankHub
from greenroom.startup import StartupError

log = get_logger(__name__)


class _Store:
    """Holds the TCPStore for the node's life (torch frees it with the last reference)."""

    def __init__(self, store) -> None:
        self.store = store

    def close(self) -> None:
        self.store = None


def rank_bus_address(cfg: NodeConfig, ipc_address: str) -> tuple[str, str]:
    """(where the head binds the rank bus, where workers and agents connect to it)."""
    p = cfg.parallel
    if p.nnodes == 1:
        return ipc_address, ipc_address
    host = p.master_addr if is_loopback(p.master_addr) else "*"
    return f"tcp://{host}:{p.master_port + 1}", f"tcp://{p.master_addr}:{p.master_port + 1}"


def rank_bus_security(cfg: NodeConfig, bind: str) -> SocketSecurity | None:
    """CURVE for a rank bus other nodes reach over TCP (none for one node's ipc socket)."""
    if not bind.startswith("tcp://"):
        return None
    host = bind.removeprefix("tcp://").rpartition(":")[0]
    return peer_socket_security(cfg, host, "the rank bus (parallel.master_port + 1)")


async def start_rank_group(
    cfg: NodeConfig, sup: Supervisor, resources: list
) -> dict[str, ActorRef]:
    """Start the store and the rank bus (kept across group restarts), then the supervised
    group engine, which starts the ranks; returns the engine refs by flow."""
    import torch.distributed as dist

    p = cfg.parallel
    layout = layout_of(cfg)
    bind, address = rank_bus_address(cfg, sup.rt.ipc_address("rank-bus"))
    security = rank_bus_security(cfg, bind)
    try:
        store = dist.TCPStore(
            p.master_addr,
            p.master_port,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=p.collective_timeout_s),
        )
    except (RuntimeError, OSError) as exc:
        raise StartupError(
            f"cannot listen on the master address {p.master_addr}:{p.master_port} ({exc}); "
            "is another node already node 0 (a node rank given twice), or is "
            "--master-addr not an address of this machine?"
        ) from None
    resources.append(_Store(store))
    try:
        hub = RankHub(sup.rt.transport(), layout, bind, address, security, cfg.security.insecure)
    except Exception as exc:
        raise StartupError(f"cannot bind the rank bus at {bind}: {exc}") from None
    resources.append(hub)
    log.info("rank layout\n" + layout.describe(), rank_bus=hub.address, store_port=store.port)
    ref = await sup.start_child(
        RankGroupEngine, cfg, hub, p.master_addr, store.port, name="engine", host="loop"
    )
    return {"mixed": ref}
