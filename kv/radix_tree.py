"""Radix prefix tree over full KV blocks, keyed by chained block hashes.

A block's hash covers its parent's hash, its token ids and an extra key (cache salt, adapter),
so equal hashes mean equal prefixes and one dict finds any node. Nodes also keep their token
ids: a lookup compares them, so a hash collision is a miss, never a wrong prefix.

Each node sits on one tier: on the GPU (it owns a GPU block) or on the host (it owns a host
block). GPU nodes form a prefix-closed subtree: a host node never has a GPU child.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from greenroom.kv.eviction import EvictionQueue

ROOT_HASH = 0


def block_hash(parent_hash: int, tokens: tuple[int, ...], extra: int) -> int:
    """Chained hash of one full block; deterministic across processes (ints and tuples only)."""
    return hash((parent_hash, tokens, extra))


def extra_key(cache_salt: str | None) -> int:
    """Stable integer for a cache salt (str hashes are randomized per process)."""
    if not cache_salt:
        return 0
    digest = hashlib.blake2b(cache_salt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class RadixNode:
    """One cached full block."""

    __slots__ = (
        "hash",
        "tokens",
        "parent",
        "children",
        "depth",
        "block",
        "on_gpu",
        "priority",
        "last_access",
        "claims",
        "gpu_children",
        "queue",
        "queue_seq",
    )

    def __init__(
        self,
        block_hash: int,
        tokens: tuple[int, ...],
        parent: RadixNode | None,
        block: int,
        on_gpu: bool,
        priority: int,
        last_access: int,
    ) -> None:
        self.hash = block_hash
        self.tokens = tokens
        self.parent = parent
        self.children: dict[int, RadixNode] = {}
        self.depth = 0 if parent is None else parent.depth + 1
        self.block = block  # GPU block id when on_gpu, else host block id
        self.on_gpu = on_gpu
        self.priority = priority
        self.last_access = last_access
        self.claims = 0  # admissions in flight that matched this node while it was on the host
        self.gpu_children = 0
        self.queue: EvictionQueue | None = None
        self.queue_seq = -1

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        tier = "gpu" if self.on_gpu else "host"
        return f"RadixNode(depth={self.depth}, {tier}:{self.block}, prio={self.priority})"


class RadixTree:
    """The node index and parent/child links; tier bookkeeping is the caller's."""

    __slots__ = ("root", "_index")

    def __init__(self) -> None:
        self.root = RadixNode(ROOT_HASH, (), None, -1, True, 100, 0)
        self._index: dict[int, RadixNode] = {}

    def __len__(self) -> int:
        return len(self._index)

    def get(self, h: int) -> RadixNode | None:
        return self._index.get(h)

    def lookup(self, parent: RadixNode, h: int, tokens: tuple[int, ...]) -> RadixNode | None:
        """The child of `parent` holding exactly `tokens`, or None."""
        node = self._index.get(h)
        if node is None or node.parent is not parent or node.tokens != tokens:
            return None
        return node

    def add(
        self,
        parent: RadixNode,
        h: int,
        tokens: tuple[int, ...],
        block: int,
        on_gpu: bool,
        priority: int,
        last_access: int,
    ) -> RadixNode:
        if h in self._index:
            raise ValueError(f"block hash {h} is already in the tree")
        if on_gpu and not parent.on_gpu:
            raise ValueError("a GPU block cannot extend a prefix that lives on the host")
        node = RadixNode(h, tokens, parent, block, on_gpu, priority, last_access)
        self._index[h] = node
        parent.children[h] = node
        if on_gpu:
            parent.gpu_children += 1
        return node

    def remove(self, node: RadixNode) -> None:
        """Unlink a node that has no children."""
        if node.children:
            raise ValueError("only a leaf can leave the tree")
        parent = node.parent
        assert parent is not None, "the root never leaves the tree"
        del self._index[node.hash]
        del parent.children[node.hash]
        if node.on_gpu:
            parent.gpu_children -= 1
        node.parent = None

    def move(self, node: RadixNode, on_gpu: bool, block: int) -> None:
        """Put `node` on the other tier, now owning `block` there."""
        parent = node.parent
        assert parent is not None and node.on_gpu != on_gpu
        if on_gpu:
            if not parent.on_gpu:
                raise ValueError("a host block's parent must be on the GPU before it is")
            if node.gpu_children:
                raise AssertionError("unreachable: a host node has a GPU child")
            parent.gpu_children += 1
        else:
            if node.gpu_children:
                raise ValueError("a block with GPU children cannot leave the GPU")
            parent.gpu_children -= 1
        node.on_gpu = on_gpu
        node.block = block

    def nodes(self) -> list[RadixNode]:
        """Every node but the root (O(n): for tests and checks)."""
        return list(self._index.values())
