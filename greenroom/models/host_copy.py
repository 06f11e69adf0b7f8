"""Host-to-device copies that do not hold the host.

An engine launches a step while the previous one still runs on the GPU (overlapped steps). A
copy from pageable host memory waits until its stream has drained, so one such copy in a
launch makes the host wait for the whole previous step and the GPU then idles while the rest
of the launch is queued. Every small per-step input goes through pinned memory instead; the
caching host allocator keeps a pinned buffer until the copy that reads it has run.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device | str):
    """A tensor of ``values`` on ``device``, copied asynchronously from pinned memory."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, array: np.ndarray) -> None:
    """Copy ``array`` into ``dst`` (same shape), asynchronously from pinned memory on a GPU."""
    if dst.device.type == "cpu":
        dst.copy_(torch.from_numpy(array))
        return
    host = torch.empty(array.shape, dtype=dst.dtype, pin_memory=True)
    host.numpy()[...] = array
    dst.copy_(host, non_blocking=True)


__all__ = ["copy_from_host", "to_device"]
