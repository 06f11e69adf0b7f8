"""Per-step host-to-device copies (greenroom.models.host_copy): values arrive intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from greenroom.kernels.prefill_tiles import max_tiles, prefill_tiles
from greenroom.models.host_copy import copy_from_host, to_device

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_from_host_fills_the_device_tensor(device: str) -> None:
    tiles = prefill_tiles([5, 40], [9, 40], max_tiles(64, 2))
    expected = tiles.copy()
    dst = torch.full(tiles.shape, -7, dtype=torch.from_numpy(tiles).dtype, device=device)
    copy_from_host(dst, tiles)
    tiles[...] = 0  # the caller may reuse its array at once
    assert np.array_equal(dst.cpu().numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_keeps_values_and_dtype(device: str) -> None:
    seeds = [0, 1, (1 << 63) - 1, 12345]
    t = to_device(seeds, torch.int64, device)
    assert t.device.type == device and t.dtype == torch.int64
    assert t.cpu().tolist() == seeds
    temps = to_device([0.0, 0.7, 1.5], torch.float32, device)
    assert temps.dtype == torch.float32
    assert temps.cpu().tolist() == pytest.approx([0.0, 0.7, 1.5])
