"""KVCacheManager: the KV manager's state machine behind one `KVStep` per iteration.

Synchronous and free of I/O; the KV-manager actor wraps it. A step applies, in order: frees,
computed-token reports, extends, then the batch of admits (two-phase, see admission.py). The
result lists the host-tier copies the engine must run, in order, before its next forward.
"""

from __future__ import annotations

import time

from greenroom.bus.messages import (
    KVAdmit,
    KVAdmitted,
    KVAgentInfo,
    KVComputed,
    KVExtend,
    KVFree,
    KVReceive,
    KVStats,
    KVStep,
    KVStepResult,
    TransferHandle,
)
from greenroom.config import KVConfig, KVTransferConfig
from greenroom.kv.admission import BatchAdmission
from greenroom.kv.events import EventLog, EventSink
from greenroom.kv.invariants import check_manager
from greenroom.kv.prefix_cache import PrefixCache
from greenroom.kv.radix_tree import block_hash, extra_key
from greenroom.kv.request_blocks import RequestBlocks, cache_full_blocks, release_blocks
from greenroom.kv.transfer_sessions import TransferSessions


class KVCacheManager:
    """Block state of one KV pool: `num_gpu_blocks` includes the reserved null block 0.

    With Helix context parallelism the pool spans `cp_size` ranks of `num_gpu_blocks / cp_size`
    blocks each (every rank's first block is its null block) and block j of every request lives
    on rank j mod cp_size (kv/helix_placement.py)."""

    def __init__(
        self,
        kv_cfg: KVConfig,
        num_gpu_blocks: int,
        event_sink: EventSink | None = None,
        cp_size: int = 1,
    ) -> None:
        if num_gpu_blocks < cp_size:
            raise ValueError(
                f"num_gpu_blocks = {num_gpu_blocks} is invalid: must be >= cp_size = {cp_size}"
            )
        self.cp_size = cp_size
        self.cfg = kv_cfg
        self.tokens_per_block = kv_cfg.tokens_per_block
        self.prefix_reuse = kv_cfg.enable_prefix_reuse
        # kv.host_blocks is per CP rank, as each rank's GPU pool is
        host_blocks = kv_cfg.host_blocks * cp_size if self.prefix_reuse else 0
        self.events = EventLog(event_sink)
        self.cache = PrefixCache(
            num_gpu_blocks, host_blocks, kv_cfg.offload_min_priority, self.events, cp_size
        )
        self.requests: dict[str, RequestBlocks] = {}
        self.admission = BatchAdmission(
            self.cache,
            self.requests,
            self.tokens_per_block,
            self.prefix_reuse,
            kv_cfg.default_priority,
        )
        self.transfers = TransferSessions()
        self.transfer_cfg = KVTransferConfig()
        self.agent: KVAgentInfo | None = None  # this node's engine's NIXL agent (context role)
        self.tp_size = 1
        self._handles: list[TransferHandle] = []

    def configure_transfer(
        self, cfg: KVTransferConfig, agent: KVAgentInfo | None, tp_size: int = 1
    ) -> None:
        """Disaggregated roles: lease timing and the agent whose pool the handles name."""
        self.transfer_cfg, self.agent, self.tp_size = cfg, agent, tp_size

    # ------------------------------------------------------------------ the step

    def step(self, msg: KVStep) -> KVStepResult:
        for t in msg.transfers:
            if t.state == "pending" and t.handle is not None:
                # no read starts past this: the lease may end any time then
                deadline = t.handle.lease_deadline - self.transfer_cfg.lease_margin_s
                self.transfers.expect(t.request_id, t.handle, deadline)
            else:
                self.transfers.settle_receive(t.request_id, t.state)
        for f in msg.free:
            self.free(f)
        for c in msg.computed:
            self.computed(c)
        if msg.drop_cache:
            self.cache.drop_idle()
        extended: dict[str, list[int]] = {}
        failed_extend: list[str] = []
        for e in msg.extend:
            new_blocks = self.extend(e)
            if new_blocks is None:
                failed_extend.append(e.request_id)
            elif new_blocks:
                extended[e.request_id] = new_blocks
        admitted, rejected = self.admission.admit_batch(msg.admit)
        receives = self._receives(msg.admit, admitted)
        handles, self._handles = self._handles, []
        result = KVStepResult(
            iteration=msg.iteration,
            copies=self.cache.take_copies(),
            admitted=admitted,
            rejected=rejected,
            extended=extended,
            failed_extend=failed_extend,
            free_blocks=self.num_free_blocks,
            total_blocks=self.cache.gpu.capacity,
            handles=handles,
            receives=receives,
        )
        self.events.flush()
        return result

    def free(self, msg: KVFree) -> None:
        """Release a request's blocks, caching its computed full blocks first. Idempotent."""
        req = self.requests.pop(msg.request_id, None)
        if req is None:
            return
        written = req.computed_tokens
        if msg.output_token_ids:
            # The prompt was prefilled; every token but the last sampled one has its KV.
            req.token_ids = req.token_ids + list(msg.output_token_ids)
            written = max(written, len(req.token_ids) - 1)
        if self.prefix_reuse:
            cache_full_blocks(
                self.cache, req, written // self.tokens_per_block, self.tokens_per_block
            )
        if msg.lease and self.agent is not None and msg.output_token_ids:
            self._lease(
                req, len(req.token_ids) - len(msg.output_token_ids), msg.output_token_ids[0]
            )
            return
        release_blocks(self.cache, req)

    # ------------------------------------------------------------------ KV transfer

    def _lease(self, req: RequestBlocks, num_tokens: int, first_token: int) -> None:
        """Keep a prefilled request's blocks for a receiver and make its handle."""
        a = self.agent
        need = -(-num_tokens // self.tokens_per_block)
        handle = a.handle(
            req.request_id,
            list(req.block_ids[:need]),
            num_tokens,
            first_token,
            self.tokens_per_block,
            self.tp_size,
            lease_deadline=time.time() + self.transfer_cfg.lease_s,
        )
        self.transfers.lease(req, handle)
        self._handles.append(handle)

    def end_lease(self, request_id: str, outcome: str) -> bool:
        """The receiver is done with a lease: free its blocks. False if no such lease."""
        req = self.transfers.end_lease(request_id, outcome)
        if req is None:
            return False
        release_blocks(self.cache, req)
        return True

    def sweep_leases(self, now: float | None = None) -> int:
        """Free the blocks of leases past their deadline; how many leases ended."""
        expired = self.transfers.expired_leases(time.time() if now is None else now)
        for req in expired:
            release_blocks(self.cache, req)
        return len(expired)

    def _receives(self, asks: list[KVAdmit], admitted: list[KVAdmitted]) -> list[KVReceive]:
        """Generation role: the reads admitted receivers need, for the blocks the local prefix
        cache did not already hold."""
        wanted = {a.request_id: a.receive for a in asks if a.receive is not None}
        out = []
        now = time.time()
        cfg = self.transfer_cfg
        for a in admitted:
            h = wanted.get(a.request_id)
            if h is None:
                continue
            tpb = self.tokens_per_block
            need = -(-h.num_tokens // tpb)
            have = min(a.num_cached_tokens // tpb, need)
            deadline = min(now + cfg.timeout_s, h.lease_deadline - cfg.lease_margin_s)
            self.transfers.receive(a.request_id, h, deadline)
            self.transfers.started(a.request_id)
            out.append(
                KVReceive(
                    request_id=a.request_id,
                    handle=h,
                    remote_blocks=list(h.block_ids[have:need]),
                    local_blocks=list(a.block_ids[have:need]),
                    deadline=deadline,
                )
            )
        return out

    def computed(self, msg: KVComputed) -> None:
        """Every later plan has the first `num_tokens` tokens' KV: make full blocks matchable."""
        req = self.requests.get(msg.request_id)
        if req is None or msg.num_tokens <= req.computed_tokens:
            return
        req.computed_tokens = msg.num_tokens
        if self.prefix_reuse:
            tpb = self.tokens_per_block
            cache_full_blocks(self.cache, req, msg.num_tokens // tpb, tpb)

    def extend(self, msg: KVExtend) -> list[int] | None:
        """New blocks so the request covers `num_tokens`; None (nothing changed) if no room or
        the request is unknown."""
        req = self.requests.get(msg.request_id)
        if req is None:
            return None
        have, cp = len(req.block_ids), self.cp_size
        need = -(-msg.num_tokens // self.tokens_per_block) - have
        if need <= 0:
            return []
        wanted = [0] * cp
        for j in range(have, have + need):
            wanted[j % cp] += 1
        if any(w > self.cache.num_free_on(r) for r, w in enumerate(wanted)):
            return None
        new_blocks = [self.cache.allocate(rank=j % cp) for j in range(have, have + need)]
        req.block_ids.extend(new_blocks)
        return new_blocks

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable without failing: truly free plus idle cached ones."""
        return self.cache.num_free

    @property
    def total_blocks(self) -> int:
        return self.cache.gpu.capacity

    def holds(self, request_id: str) -> bool:
        return request_id in self.requests

    def blocks_of(self, request_id: str) -> list[int]:
        req = self.requests.get(request_id)
        return list(req.block_ids) if req is not None else []

    def match_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        """Tokens an admit of `token_ids` would find cached now (GPU or host); changes nothing."""
        if not self.prefix_reuse:
            return 0
        tpb, tree = self.tokens_per_block, self.cache.tree
        extra, node, matched = extra_key(cache_salt), tree.root, 0
        for i in range(max(0, (len(token_ids) - 1) // tpb)):
            tokens = tuple(token_ids[i * tpb : (i + 1) * tpb])
            node = tree.lookup(node, block_hash(node.hash, tokens, extra), tokens)
            if node is None:
                break
            matched += 1
        return matched * tpb

    def evict(self, num_blocks: int) -> int:
        """Evict up to `num_blocks` idle cached blocks (offloading where allowed); returns how
        many. Their copies go out with the next step's result."""
        return self.cache.evict(num_blocks)

    def stats(self) -> KVStats:
        cache, adm = self.cache, self.admission
        return KVStats(
            total_blocks=cache.gpu.capacity,
            free_blocks=cache.num_free,
            host_blocks=cache.host.capacity,
            free_host_blocks=cache.host.num_free,
            lookups_blocks=adm.lookup_blocks,
            hit_blocks=adm.hit_blocks,
            onboarded_blocks=cache.onboarded_blocks,
            offloaded_blocks=cache.offloaded_blocks,
            leased_blocks=self.transfers.leased_blocks,
            transfers=self.transfers.counts(),
            rank_used_blocks=self.rank_used_blocks() if self.cp_size > 1 else [],
        )

    def rank_used_blocks(self) -> list[int]:
        """Blocks each CP rank holds for requests (every rank's null block left out)."""
        per_rank = self.cache.gpu.capacity // self.cp_size
        return [per_rank - self.cache.num_free_on(r) for r in range(self.cp_size)]

    def check_invariants(self) -> None:
        """Full O(n) consistency check; raises AssertionError naming what broke."""
        check_manager(self)


__all__ = ["KVCacheManager"]
