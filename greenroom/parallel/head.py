"""Node 0's side of a multi-rank node: the rendezvous store, the rank bus, the group engine."""

from __future__ import annotations

from datetime import timedelta

from greenroom.actors import ActorRef, Supervisor
from greenroom.config import NodeConfig
from greenroom.logging import get_logger
from greenroom.parallel.group_engine import RankGroupEngine, layout_of
from greenroom.parallel.hub import RankHub

log = get_logger(__name__)


class _Store:
    """Holds the TCPStore for the node's life (torch frees it with the last reference)."""

    def __init__(self, store) -> None:
        self.store = store

    def close(self) -> None:
        self.store = None


def rank_bus_address(cfg: NodeConfig, ipc_address: str) -> str:
    p = cfg.parallel
    if p.nnodes == 1:
        return ipc_address
    return f"tcp://{p.master_addr}:{p.master_port + 1}"


async def start_rank_group(
    cfg: NodeConfig, sup: Supervisor, resources: list
) -> dict[str, ActorRef]:
    """Start the store and the rank bus (kept across group restarts), then the supervised
    group engine, which starts the ranks; returns the engine refs by flow."""
    import torch.distributed as dist

    p = cfg.parallel
    layout = layout_of(cfg)
    store = dist.TCPStore(
        p.master_addr,
        p.master_port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=p.collective_timeout_s),
    )
    resources.append(_Store(store))
    hub = RankHub(sup.rt.transport(), layout, rank_bus_address(cfg, sup.rt.ipc_address("rank-bus")))
    resources.append(hub)
    log.info("rank layout\n" + layout.describe(), rank_bus=hub.address, store_port=store.port)
    ref = await sup.start_child(
        RankGroupEngine, cfg, hub, p.master_addr, store.port, name="engine", host="loop"
    )
    return {"mixed": ref}
