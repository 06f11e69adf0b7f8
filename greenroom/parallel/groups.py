"""torch.distributed process groups of one rank, built once from the rank layout.

Rendezvous goes through a TCPStore the head owns for the node's whole life; each start of the
rank group (an *epoch*) uses its own key prefix, so a restarted group never reads a dead
one's keys. Backend: NCCL when the rank has a GPU, gloo otherwise; every group carries the
collective timeout, so a dead rank is an error after that long, never a hang.

Groups are created for every axis set with more than one rank — ("tp",), ("pp",), ("cp",),
("cp", "tp") — by every rank in the same order (torch.distributed requires it); a rank keeps
the ones it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from greenroom.parallel.comm import TensorParallel
from greenroom.parallel.layout import RankCoords, RankLayout

AXIS_SETS: tuple[tuple[str, ...], ...] = (("tp",), ("pp",), ("cp",), ("cp", "tp"))


@dataclass
class RankGroups:
    layout: RankLayout
    rank: int
    coords: RankCoords
    backend: str
    device: torch.device
    groups: dict[tuple[str, ...], Any] = field(default_factory=dict)  # axes -> ProcessGroup

    @property
    def tp(self) -> TensorParallel:
        if self.layout.tp_size == 1:
            return TensorParallel.single()
        return TensorParallel(self.coords.tp, self.layout.tp_size, self.groups[("tp",)])

    @property
    def cp(self) -> TensorParallel:
        """The Helix CP group, as the TP collectives of the layers that run sharded over it."""
        if self.layout.cp_size == 1:
            return TensorParallel.single()
        return TensorParallel(self.coords.cp, self.layout.cp_size, self.groups[("cp",)])

    @property
    def model(self) -> TensorParallel:
        """The group that runs one model replica's layers together: TP, Helix CP, or Helix
        CP x TP (rank ``cp * tp_size + tp`` of ``cp_size * tp_size``)."""
        lay, c = self.layout, self.coords
        if lay.cp_size > 1 and lay.tp_size > 1:
            rank = c.cp * lay.tp_size + c.tp
            return TensorParallel(rank, lay.cp_size * lay.tp_size, self.groups[("cp", "tp")])
        return self.cp if lay.cp_size > 1 else self.tp

    def destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_rank_groups(
    layout: RankLayout,
    rank: int,
    store_addr: str,
    store_port: int,
    epoch: int,
    device: torch.device,
    timeout_s: float,
) -> RankGroups:
    """Join the world of ``epoch`` through the head's store and build every group."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        store_addr, store_port, is_master=False, timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(f"greenroom/epoch-{epoch}", store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init: the communicator exists before capture
    dist.init_process_group(
        backend,
        store=prefixed,
        rank=rank,
        world_size=layout.world_size,
        timeout=timeout,
        **kwargs,
    )
    out = RankGroups(layout, rank, layout.coords(rank), backend, device)
    for axes in AXIS_SETS:
        if all(layout.size(a) == 1 for a in axes) or (
            len(axes) > 1 and any(layout.size(a) == 1 for a in axes)
        ):
            continue
        for ranks in layout.groups(axes):
            if len(ranks) == layout.world_size:
                group = dist.group.WORLD
            else:
                group = dist.new_group(ranks, timeout=timeout, backend=backend)
            if rank in ranks:
                out.groups[axes] = group
    return out
