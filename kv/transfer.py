"""KV transfer between nodes through NIXL: the engine side (the engine owns the KV pool).

Each engine of a context or generation node registers its whole KV pool with one NIXL agent
(UCX backend) once at start. The generation engine reads: a receive is one descriptor list
built from the block ids, with runs that are consecutive on both sides merged into one
descriptor, and the request id as the completion notification. Pools are block-major (one block
of all layers is contiguous), so block ``b`` starts at ``pool_address + b * block_bytes``.

NIXL calls happen only on the engine's thread; the bus carries handles and states only.
"""

from __future__ import annotations

import importlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from greenroom.bus.messages import KVAgentInfo, KVReceive, TransferUpdate
from greenroom.logging import get_logger

log = get_logger(__name__)

# CUDA 13 first: on a CPU-only machine its UCX moves DRAM (what CI tests)
_NIXL_MODULES = ("nixl_cu13", "nixl_cu12", "nixl")


class NixlUnavailable(RuntimeError):
    """No NIXL wheel is installed: disaggregated roles cannot move KV."""


def load_nixl() -> Any:
    for name in _NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise NixlUnavailable(
        "context and generation roles need NIXL: pip install 'greenroom[disagg]' "
        "(the nixl-cu13 wheel; nixl-cu12 for a CUDA 12 torch)"
    )


def kv_layout(model_name: str, pool: torch.Tensor) -> str:
    """What one block holds; two nodes exchange KV only when theirs are equal."""
    block_shape = "x".join(str(d) for d in pool.shape[1:])  # layers, K/V, tokens, heads, dim
    return f"{model_name}:block={block_shape}:{pool.dtype}"


def block_runs(remote: list[int], local: list[int]) -> list[tuple[int, int, int]]:
    """``(remote_start, local_start, count)`` for runs consecutive on both sides."""
    if len(remote) != len(local):
        raise ValueError(f"{len(remote)} remote blocks for {len(local)} local blocks")
    runs: list[tuple[int, int, int]] = []
    for r, loc in zip(remote, local, strict=True):
        if runs:
            rs, ls, n = runs[-1]
            if r == rs + n and loc == ls + n:
                runs[-1] = (rs, ls, n + 1)
                continue
        runs.append((r, loc, 1))
    return runs


@dataclass
class _Read:
    request_id: str
    handle: Any  # nixl_xfer_handle
    deadline: float
    cancelled: bool = False


class KVTransferAgent:
    """One NIXL agent over one engine's KV pool: start, poll, wait and cancel reads."""

    def __init__(self, pool: torch.Tensor, model_name: str, name: str | None = None) -> None:
        nixl = load_nixl()
        self.name = name or f"greenroom-{uuid.uuid4().hex[:12]}"
        self.pool = pool
        self.agent = nixl.nixl_agent(self.name, nixl.nixl_agent_config(backends=["UCX"]))
        self._registered = self.agent.register_memory(pool)
        self.block_bytes = pool[0].numel() * pool.element_size()
        self.mem_type = "DRAM" if pool.device.type == "cpu" else "VRAM"
        self.device_id = pool.device.index or 0
        self.layout = kv_layout(model_name, pool)
        self._remotes: set[str] = set()
        self._reads: dict[str, _Read] = {}
        self._queued: dict[str, tuple[KVReceive, float]] = {}  # reads that start later, by
        # the time they were handed over
        self._settled: list[TransferUpdate] = []
        # fault injection (tests, chaos runs): the next read names memory no agent registered;
        # every read starts ``delay_s`` late, and none before ``hold_until`` (lowering it
        # releases the reads it held)
        self.fail_next: str | None = None
        self.delay_s = 0.0
        self.hold_until = 0.0

    def info(self) -> KVAgentInfo:
        return KVAgentInfo(
            agent_name=self.name,
            agent_metadata=self.agent.get_agent_metadata(),
            pool_address=self.pool.data_ptr(),
            block_bytes=self.block_bytes,
            pool_blocks=self.pool.shape[0],
            mem_type=self.mem_type,
            device_id=self.device_id,
            kv_layout=self.layout,
        )

    @property
    def pending(self) -> int:
        return len(self._reads) + len(self._queued)

    # ------------------------------------------------------------------ reads

    def start(self, recv: KVReceive) -> None:
        """Post one read; a read that cannot start settles at once (see ``poll``)."""
        rid = recv.request_id
        if rid in self._reads or rid in self._queued:
            self._settled.append(
                TransferUpdate(rid, "error", "a read for this request is already in progress")
            )
            return
        now = time.time()
        if self._due(now) > now:
            self._queued[rid] = (recv, now)
            return
        self._post_now(recv)

    def _due(self, handed_at: float) -> float:
        return max(handed_at + self.delay_s, self.hold_until)

    def _post_due(self, now: float) -> None:
        for rid, (recv, handed_at) in list(self._queued.items()):
            if recv.deadline <= now:
                del self._queued[rid]
                self._settled.append(TransferUpdate(rid, "timed_out", "the read never started"))
            elif self._due(handed_at) <= now:
                del self._queued[rid]
                self._post_now(recv)

    def _post_now(self, recv: KVReceive) -> None:
        rid = recv.request_id
        if time.time() >= recv.deadline:
            self._settled.append(
                TransferUpdate(rid, "timed_out", "the lease ran out before the read could start")
            )
            return
        try:
            handle = self._post(recv)
        except Exception as exc:  # a bad handle or a NIXL error fails this request only
            log.warning("kv read refused", request_id=rid, error=repr(exc))
            self._settled.append(TransferUpdate(rid, "error", f"KV read failed: {exc}"))
            return
        if handle is None:  # nothing to read: the local prefix cache held every block
            self._settled.append(TransferUpdate(rid, "complete"))
            return
        self._reads[rid] = _Read(rid, handle, recv.deadline)

    def _post(self, recv: KVReceive) -> Any:
        h = recv.handle
        if h.block_bytes != self.block_bytes or h.kv_layout != self.layout:
            raise ValueError(
                f"the context node's KV blocks ({h.kv_layout}, {h.block_bytes} B) differ from "
                f"this node's ({self.layout}, {self.block_bytes} B)"
            )
        if h.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"memory kind {h.mem_type!r} is invalid: DRAM or VRAM")
        local_max = self.pool.shape[0]
        if any(not 0 < b < h.pool_blocks for b in recv.remote_blocks):
            raise ValueError(f"remote block ids outside the context pool [1, {h.pool_blocks})")
        if any(not 0 < b < local_max for b in recv.local_blocks):
            raise ValueError(f"local block ids outside this pool [1, {local_max})")
        runs = block_runs(list(recv.remote_blocks), list(recv.local_blocks))
        if not runs:
            return None
        if h.agent_name not in self._remotes:
            added = self.agent.add_remote_agent(h.agent_metadata)
            added = added.decode() if isinstance(added, bytes) else added
            if added != h.agent_name:
                raise ValueError(
                    f"agent metadata names {added!r}, the handle names {h.agent_name!r}"
                )
            self._remotes.add(h.agent_name)
        bb = self.block_bytes
        base = self.pool.data_ptr()
        remote_base = h.pool_address
        if self.fail_next is not None:  # an address no agent registered: NIXL refuses it
            self.fail_next = None
            remote_base += h.pool_blocks * bb * 4
        local = [(base + ls * bb, n * bb, self.device_id) for _, ls, n in runs]
        remote = [(remote_base + rs * bb, n * bb, h.device_id) for rs, _, n in runs]
        xfer = self.agent.initialize_xfer(
            "READ",
            self.agent.get_xfer_descs(local, self.mem_type),
            self.agent.get_xfer_descs(remote, h.mem_type),
            h.agent_name,
            recv.request_id.encode(),
        )
        state = self.agent.transfer(xfer)
        if state == "ERR":
            self._release(xfer)
            raise RuntimeError("NIXL refused to post the read")
        return xfer

    def cancel(self, request_id: str) -> None:
        """Abandon a read: its NIXL handle is released before the update says ``cancelled``,
        so the caller may free the blocks it was writing."""
        read = self._reads.get(request_id)
        if read is None:
            # held, not started; or settled already, and then the earlier report stands
            why = "cancelled before it started" if self._queued.pop(request_id, None) else ""
            self._settled.append(
                TransferUpdate(request_id, "cancelled", why or "no read in progress")
            )
            return
        read.cancelled = True
        self._check(read, time.time())

    def poll(self) -> list[TransferUpdate]:
        """Reads that settled since the last call (complete | error | cancelled | timed_out)."""
        now = time.time()
        self._post_due(now)
        for read in list(self._reads.values()):
            self._check(read, now)
        out, self._settled = self._settled, []
        return out

    def wait(self, request_ids: list[str], deadline: float) -> None:
        """Block until the named reads settle (each has its own deadline as well)."""
        while any(rid in self._reads or rid in self._queued for rid in request_ids):
            now = time.time()
            self._post_due(now)
            for rid in request_ids:
                read = self._reads.get(rid)
                if read is not None:
                    self._check(read, now)
            if now >= deadline:
                return
            time.sleep(0.0002)

    def wait_any(self, timeout_s: float) -> None:
        """Idle engine with reads in flight: wait briefly for one to settle."""
        end = time.time() + timeout_s
        before = len(self._settled)
        while self.pending and len(self._settled) == before and time.time() < end:
            self._post_due(time.time())
            for read in list(self._reads.values()):
                self._check(read, time.time())
            time.sleep(0.0002)

    def _check(self, read: _Read, now: float) -> None:
        state = self.agent.check_xfer_state(read.handle)
        if state == "PROC":
            if read.cancelled:
                if self._release(read.handle):
                    self._settle(read.request_id, "cancelled")
            elif now >= read.deadline:
                if self._release(read.handle):
                    self._settle(read.request_id, "timed_out", "the KV read did not finish in time")
            return
        self._release(read.handle)
        if read.cancelled:
            self._settle(read.request_id, "cancelled")
        elif state == "DONE":
            self._settle(read.request_id, "complete")
        else:
            self._settle(read.request_id, "error", "NIXL reported an error for the KV read")

    def _settle(self, request_id: str, state: str, message: str = "") -> None:
        self._reads.pop(request_id, None)
        self._settled.append(TransferUpdate(request_id, state, message))

    def _release(self, xfer: Any) -> bool:
        """Release a transfer handle (NIXL aborts one in flight); False if it refused."""
        try:
            self.agent.release_xfer_handle(xfer)
            return True
        except Exception as exc:
            log.warning("NIXL kept a transfer handle; retrying", error=repr(exc))
            return False

    def close(self) -> None:
        for read in list(self._reads.values()):
            self._release(read.handle)
        self._reads.clear()
        self._queued.clear()
        for name in self._remotes:
            try:
                self.agent.remove_remote_agent(name)
            except Exception:
                pass
        self._remotes.clear()
        try:
            self.agent.deregister_memory(self._registered)
        except Exception as exc:
            log.warning("NIXL deregistration failed", error=repr(exc))


__all__ = ["KVTransferAgent", "NixlUnavailable", "block_runs", "kv_layout", "load_nixl"]
