"""The collectives a tensor-parallel model runs, over its TP process group.

``TensorParallel.single()`` (tp_size 1) makes every collective the identity, so the model code
is the same at any size and a single rank pays one Python branch per call. On GPUs the group
is NCCL and the collectives run on the current stream, so a decode CUDA graph captures them;
on the CPU the group is gloo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None when size == 1

    @classmethod
    def single(cls) -> TensorParallel:
        return cls()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x [rows, n]`` along the last dim, rank order: ``[rows,
        size * n]``."""
        if self.size == 1:
            return x
        rows, n = x.shape
        out = torch.empty((self.size * rows, n), dtype=x.dtype, device=x.device)
        gather_into(out, x.contiguous(), self.group)
        return out.view(self.size, rows, n).transpose(0, 1).reshape(rows, self.size * n)

    def all_gather_ints(self, values: list[int], device: torch.device) -> torch.Tensor:
        """Every rank's ``values`` as ``[size, len(values)]`` int64 (plan-id checks)."""
        local = torch.tensor(values, dtype=torch.int64, device=device)
        if self.size == 1:
            return local.unsqueeze(0)
        out = torch.empty((self.size * len(values),), dtype=torch.int64, device=device)
        gather_into(out, local, self.group)
        return out.view(self.size, len(values))


def gather_into(out: torch.Tensor, x: torch.Tensor, group: Any, async_op: bool = False) -> Any:
    """All-gather ``x`` of every rank into ``out`` (concatenated along dim 0)."""
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)
