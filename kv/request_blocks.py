"""One request's blocks: its block table, the tree nodes of its computed full blocks, and how
those blocks become cached and are released.

`nodes[i]` is the tree node for full block i. Usually it owns `block_ids[i]`; when another
request had already cached the same block, the node is that request's and this request keeps
its own copy private while holding one reference on the node's block (a pin), so that every
holder of a node also holds all the node's ancestors.
"""

from __future__ import annotations

from greenroom.kv.prefix_cache import PrefixCache
from greenroom.kv.radix_tree import RadixNode, block_hash


class RequestBlocks:
    __slots__ = (
        "request_id",
        "token_ids",
        "block_ids",
        "nodes",
        "extra",
        "priority",
        "computed_tokens",
        "sealed",
    )

    def __init__(
        self,
        request_id: str,
        token_ids: list[int],
        block_ids: list[int],
        nodes: list[RadixNode],
        extra: int,
        priority: int,
        computed_tokens: int,
    ) -> None:
        self.request_id = request_id
        self.token_ids = token_ids
        self.block_ids = block_ids
        self.nodes = nodes
        self.extra = extra
        self.priority = priority
        self.computed_tokens = computed_tokens
        self.sealed = False  # a hash collision stopped caching further blocks

    def held_blocks(self) -> list[int]:
        """Every GPU block this request references: its block table, then its pins."""
        pins = [n.block for n, b in zip(self.nodes, self.block_ids, strict=False) if n.block != b]
        return self.block_ids + pins


def cache_full_blocks(cache: PrefixCache, req: RequestBlocks, num_blocks: int, tpb: int) -> None:
    """Insert the request's first `num_blocks` full blocks (all computed) into the tree."""
    num_blocks = min(num_blocks, len(req.block_ids), len(req.token_ids) // tpb)
    if req.sealed or num_blocks <= len(req.nodes):
        return
    tree, tokens = cache.tree, req.token_ids
    parent = req.nodes[-1] if req.nodes else tree.root
    for i in range(len(req.nodes), num_blocks):
        block_tokens = tuple(tokens[i * tpb : (i + 1) * tpb])
        h = block_hash(parent.hash, block_tokens, req.extra)
        node = tree.get(h)
        if node is None:
            node = cache.insert(parent, h, block_tokens, req.block_ids[i], req.priority)
        elif node.parent is not parent or node.tokens != block_tokens:
            req.sealed = True  # hash collision: keep the rest private
            return
        elif node.on_gpu:
            cache.ref(node.block)  # computed twice: keep the cached copy, pin it
        else:
            cache.adopt(node, req.block_ids[i])
        req.nodes.append(node)
        parent = node


def release_blocks(cache: PrefixCache, req: RequestBlocks) -> None:
    """Drop every reference the request holds; its cached blocks become idle, most recent."""
    now = cache.tick()
    for node in req.nodes:
        node.priority = req.priority
        node.last_access = now
    for block in req.held_blocks():
        cache.unref(block)
