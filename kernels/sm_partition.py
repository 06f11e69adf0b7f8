"""SM partitions for prefill/decode disaggregation on one GPU (CUDA green contexts).

`choose_sm_split` rounds a context-engine share of the SMs to what the hardware can give;
`create_sm_partitions` builds two disjoint green contexts and a stream on each. torch's own
`GreenContext.create(num_sms=N)` always takes the first N SMs, so two of them overlap; disjoint
parts need the driver's split API (cuda.bindings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

HOPPER_SM_GRANULARITY = 8


def choose_sm_split(
    total_sms: int,
    context_percent: float,
    granularity: int = HOPPER_SM_GRANULARITY,
    min_sms: int | None = None,
) -> tuple[int, int]:
    """Split `total_sms` into (context_sms, generation_sms) with sum == total_sms.

    context_sms is a multiple of `granularity` (the green-context split rounds SM groups to it;
    the generation part takes the remainder, which need not be). Among the multiples that leave
    both parts >= `min_sms` (default: `granularity`), the one closest to
    `context_percent * total_sms` wins; on a tie the smaller context part wins (decode latency is
    the tighter constraint). If no multiple satisfies `min_sms`, both parts only need >= 1 SM.
    Raises ValueError when even that is impossible.
    """
    if total_sms < 1 or granularity < 1:
        raise ValueError(f"total_sms={total_sms} and granularity={granularity} must be >= 1")
    if not 0.0 <= context_percent <= 1.0:
        raise ValueError(f"context_percent={context_percent} must be within [0, 1]")
    floor_sms = granularity if min_sms is None else min_sms
    if floor_sms < 0:
        raise ValueError(f"min_sms={floor_sms} must be >= 0")
    target = context_percent * total_sms
    for least in (floor_sms, 1):
        lo = math.ceil(least / granularity) * granularity
        hi = (total_sms - least) // granularity * granularity
        if lo <= hi:
            break
    else:
        raise ValueError(
            f"cannot split {total_sms} SMs into two non-empty parts with the context part "
            f"a multiple of {granularity}"
        )
    below = min(max(math.floor(target / granularity) * granularity, lo), hi)
    above = min(below + granularity, hi)
    context = above if abs(above - target) < abs(below - target) else below
    return context, total_sms - context


@dataclass
class SMPartitions:
    """Two disjoint green contexts on one device; keep it alive while the streams are used."""

    device: int
    total_sms: int
    context_sms: int
    generation_sms: int
    _handles: list[Any] = field(default_factory=list, repr=False)

    def destroy(self) -> None:
        """Destroy the streams and green contexts (after all work on them has finished)."""
        from cuda.bindings import driver

        for kind, handle in reversed(self._handles):
            if kind == "stream":
                _check(driver.cuStreamDestroy(handle), "cuStreamDestroy")
            else:
                _check(driver.cuGreenCtxDestroy(handle), "cuGreenCtxDestroy")
        self._handles.clear()


def _check(result: Any, what: str) -> Any:
    from cuda.bindings import driver

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err}")
    return values[0] if len(values) == 1 else tuple(values)


def _device_index(device: int | str | torch.device) -> int:
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise RuntimeError(f"SM partitions need a CUDA device, got {dev}")
    if not torch.cuda.is_available():
        raise RuntimeError("SM partitions need a CUDA device, but CUDA is not available")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def create_sm_partitions(
    context_sms: int, device: int | str | torch.device = 0
) -> tuple[torch.cuda.ExternalStream, torch.cuda.ExternalStream, SMPartitions]:
    """(context stream, generation stream, info) on disjoint SM groups of `device`.

    The context group holds `context_sms` SMs rounded up by the driver (Hopper: to a multiple of
    8); the generation group is the remainder. `info` holds the SM counts each part actually got.
    Create once at start (about a millisecond per context).
    """
    index = _device_index(device)
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise RuntimeError(
            "SM partitions need the CUDA driver bindings: pip install cuda-bindings "
            "(matching the driver's CUDA major version)"
        ) from exc
    torch.cuda.init()
    torch.zeros(1, device=f"cuda:{index}")  # make the primary context current
    _check(driver.cuInit(0), "cuInit")
    dev = _check(driver.cuDeviceGet(index), "cuDeviceGet")
    whole = _check(
        driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
        "cuDeviceGetDevResource",
    )
    total = int(whole.sm.smCount)
    if not 0 < context_sms < total:
        raise ValueError(f"context_sms={context_sms} must be within (0, {total}) on device {index}")
    groups, count, remainder = _check(
        driver.cuDevSmResourceSplitByCount(1, whole, 0, context_sms), "cuDevSmResourceSplitByCount"
    )
    if count != 1 or int(remainder.sm.smCount) == 0:
        raise RuntimeError(
            f"splitting {total} SMs at {context_sms} left no generation part "
            f"(groups={count}, remainder={int(remainder.sm.smCount)})"
        )
    info = SMPartitions(index, total, int(groups[0].sm.smCount), int(remainder.sm.smCount))
    streams = []
    try:
        for part in (groups[0], remainder):
            desc = _check(driver.cuDevResourceGenerateDesc([part], 1), "cuDevResourceGenerateDesc")
            green = _check(
                driver.cuGreenCtxCreate(
                    desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
                ),
                "cuGreenCtxCreate",
            )
            info._handles.append(("green_ctx", green))
            stream = _check(
                driver.cuGreenCtxStreamCreate(
                    green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0
                ),
                "cuGreenCtxStreamCreate",
            )
            info._handles.append(("stream", stream))
            streams.append(
                torch.cuda.ExternalStream(int(stream), device=torch.device("cuda", index))
            )
    except BaseException:
        info.destroy()
        raise
    return streams[0], streams[1], info
