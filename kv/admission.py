"""Two-phase batch admission.

Phase 1 walks the prefix tree for every admit of the batch and claims each matched block (GPU
or host): a claimed block leaves the eviction queues. Phase 2 then, request by request, onboards
the claimed host blocks and allocates new ones, evicting only unclaimed blocks. Admitting each
request with both phases in turn would let one request's onboarding or allocation evict the
prefix the next request was promised; claiming everything first rules that out.

With Helix context parallelism block j of every request comes from CP rank j mod cp_size, so
room is counted per rank.

First come, first served: when request i cannot get its blocks, it and every later admit are
rejected and their claims released; earlier ones stay admitted.
"""

from __future__ import annotations

from collections.abc import Sequence

from greenroom.bus.messages import KVAdmit, KVAdmitted
from greenroom.kv.prefix_cache import PrefixCache
from greenroom.kv.radix_tree import RadixNode, block_hash, extra_key
from greenroom.kv.request_blocks import RequestBlocks


class PrefixClaim:
    """Phase 1's result for one admit: the matched path, claimed."""

    __slots__ = ("admit", "extra", "nodes", "num_lookup_blocks")

    def __init__(
        self, admit: KVAdmit, extra: int, nodes: list[RadixNode], num_lookup_blocks: int
    ) -> None:
        self.admit = admit
        self.extra = extra
        self.nodes = nodes
        self.num_lookup_blocks = num_lookup_blocks  # prompt blocks eligible for reuse


class BatchAdmission:
    def __init__(
        self,
        cache: PrefixCache,
        requests: dict[str, RequestBlocks],
        tokens_per_block: int,
        prefix_reuse: bool,
        default_priority: int,
    ) -> None:
        self.cache = cache
        self.requests = requests
        self.tpb = tokens_per_block
        self.prefix_reuse = prefix_reuse
        self.default_priority = default_priority
        self.lookup_blocks = 0
        self.hit_blocks = 0

    def admit_batch(self, admits: Sequence[KVAdmit]) -> tuple[list[KVAdmitted], list[str]]:
        """Admit a batch; returns (admitted, rejected request ids)."""
        seen: set[str] = set()
        for a in admits:
            if a.request_id in self.requests or a.request_id in seen:
                raise ValueError(f"request {a.request_id!r} is admitted twice")
            seen.add(a.request_id)
        claims = [self.claim(a) for a in admits]
        admitted: list[KVAdmitted] = []
        for i, claim in enumerate(claims):
            result = self.fulfil(claim)
            if result is None:
                for later in claims[i:]:
                    self.release(later)
                return admitted, [c.admit.request_id for c in claims[i:]]
            admitted.append(result)
        return admitted, []

    def claim(self, admit: KVAdmit) -> PrefixClaim:
        """Phase 1: the longest cached prefix in whole blocks, short of the last prompt token."""
        extra = extra_key(admit.cache_salt)
        if not self.prefix_reuse:
            return PrefixClaim(admit, extra, [], 0)
        tpb, tokens = self.tpb, admit.token_ids
        eligible = max(0, (len(tokens) - 1) // tpb)
        tree, cache = self.cache.tree, self.cache
        now = cache.tick()
        nodes: list[RadixNode] = []
        parent = tree.root
        for i in range(eligible):
            block_tokens = tuple(tokens[i * tpb : (i + 1) * tpb])
            node = tree.lookup(parent, block_hash(parent.hash, block_tokens, extra), block_tokens)
            if node is None:
                break
            cache.claim(node)
            node.last_access = now
            nodes.append(node)
            parent = node
        return PrefixClaim(admit, extra, nodes, eligible)

    def fulfil(self, claim: PrefixClaim) -> KVAdmitted | None:
        """Phase 2: onboard the claimed host blocks, allocate the rest; None if no room (the
        claim is left for the caller to release)."""
        admit, nodes, cache = claim.admit, claim.nodes, self.cache
        total = max(-(-admit.reserve_tokens // self.tpb), len(nodes))
        onboard = sum(1 for n in nodes if not n.on_gpu)
        new = total - len(nodes)
        cp = len(cache.idle_on)
        if cp == 1:
            if onboard + new > cache.num_free:
                return None
        else:
            wanted = [0] * cp
            for j in range(total):
                if j >= len(nodes) or not nodes[j].on_gpu:
                    wanted[j % cp] += 1
            if any(w > cache.num_free_on(r) for r, w in enumerate(wanted)):
                return None
        for j, node in enumerate(nodes):
            if not node.on_gpu:
                cache.onboard(node, rank=j % cp)
        block_ids = [n.block for n in nodes]
        block_ids.extend(cache.allocate(rank=j % cp) for j in range(len(nodes), total))
        priority = admit.priority if admit.priority >= 0 else self.default_priority
        cached_tokens = len(nodes) * self.tpb
        self.requests[admit.request_id] = RequestBlocks(
            admit.request_id,
            list(admit.token_ids),
            block_ids,
            list(nodes),
            claim.extra,
            min(priority, 100),
            cached_tokens,
        )
        self.lookup_blocks += claim.num_lookup_blocks
        self.hit_blocks += len(nodes)
        return KVAdmitted(
            request_id=admit.request_id,
            block_ids=list(block_ids),
            num_cached_tokens=cached_tokens,
            reused_blocks=len(nodes) - onboard,
            onboarded_blocks=onboard,
            new_blocks=new,
            missed_blocks=claim.num_lookup_blocks - len(nodes),
        )

    def release(self, claim: PrefixClaim) -> None:
        """Give back a claim phase 2 did not use."""
        for node in claim.nodes:
            self.cache.release_claim(node)
        claim.nodes = []
