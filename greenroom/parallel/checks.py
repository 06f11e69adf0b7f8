"""Checks of a multi-rank layout that run before any process group or model load."""

from __future__ import annotations

from greenroom.config import NodeConfig
from greenroom.models.arch import ArchConfig
from greenroom.parallel.shard import check_cp_size, check_tp_size
from greenroom.parallel.stages import split_layers


def check_parallel(cfg: NodeConfig, arch: ArchConfig, gpu_count: int | None = None) -> None:
    """ValueError with one line when ``arch`` cannot be split ``tp_size`` ways, run Helix over
    ``cp_size`` ranks or be cut into ``pp_size`` stages (``pp_layers``), or this node has fewer
    GPUs than ranks to host."""
    p = cfg.parallel
    if p.world_size == 1:
        return
    check_tp_size(arch, p.tp_size)
    if p.cp_size > 1:
        check_cp_size(arch, p.cp_size, p.tp_size)
    split_layers(arch.num_layers, p.pp_size, p.pp_layers)
    check_local_gpus(cfg, gpu_count)


def check_local_gpus(cfg: NodeConfig, gpu_count: int | None = None) -> None:
    """ValueError when this node has fewer GPUs than the ranks it must host."""
    p = cfg.parallel
    if gpu_count is None:
        gpu_count = _gpu_count(cfg)
    local = p.world_size // p.nnodes
    if gpu_count and local > gpu_count:
        raise ValueError(
            f"{local} ranks per node (tp_size {p.tp_size} x pp_size {p.pp_size} x cp_size "
            f"{p.cp_size} over {p.nnodes} node(s)) but this node has {gpu_count} GPU(s)"
        )


def _gpu_count(cfg: NodeConfig) -> int:
    """GPUs the ranks would use (0: they run on the CPU)."""
    if cfg.model.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
