"""A router node (role ``router``): pairs context and generation nodes behind one client port.

    router = await RouterNode.start(cfg)   # cfg.router names the nodes; pairing is checked
    ...                                    # clients connect to router.address as to a node
    await router.stop()

Pairing is refused at start, with a message naming the nodes, when a node serves another role
or when the nodes' KV differs (model, block layout, tokens per block, ``tp_size``).

With ``security.curve_peer_keys`` the router is a CURVE client of every node, presenting its
own key pair and expecting each node's public key from there; a node serving another key
fails the handshake, so nothing it sends reaches the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

import msgspec

from greenroom.actors import ActorRef, Runtime
from greenroom.actors.frontend import FrontendLimits
from greenroom.actors.router import NodeLink, Router, close_links
from greenroom.client import AsyncClient, GreenroomError
from greenroom.config import ConfigError, NodeConfig
from greenroom.logging import get_logger
from greenroom.node_security import client_socket_security, peer_client_keys

log = get_logger(__name__)

NODE_WAIT_S = 60.0


def check_pairing(context: list[NodeLink], generation: list[NodeLink]) -> None:
    """Raise ConfigError unless every node serves its role and all hold the same KV."""
    links = context + generation
    for link in links:
        if link.info.role != link.role:
            raise ConfigError(
                f"the node at {link.address} serves role {link.info.role!r}, not {link.role!r}"
            )
    first = context[0]
    for link in links[1:]:
        a, b = first.info, link.info
        if a.tp_size != b.tp_size:
            raise ConfigError(
                f"tp_size mismatch: the {first.role} node at {first.address} runs tp_size = "
                f"{a.tp_size}, the {link.role} node at {link.address} tp_size = {b.tp_size}; "
                "disaggregated nodes must use equal tp_size (KV is not re-sharded in transfer)"
            )
        if (a.model_name, a.kv_layout, a.tokens_per_block) != (
            b.model_name,
            b.kv_layout,
            b.tokens_per_block,
        ):
            raise ConfigError(
                f"KV mismatch: the {first.role} node at {first.address} holds {a.kv_layout!r}, "
                f"the {link.role} node at {link.address} {b.kv_layout!r}; serve the same model "
                "with the same kv.tokens_per_block on every node"
            )


async def _connect(cfg: NodeConfig, address: str, role: str, wait_s: float) -> NodeLink:
    keys = peer_client_keys(cfg, address)
    client = AsyncClient(address, timeout=wait_s, keys=keys)
    client.connect()
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while True:
        try:
            info = await asyncio.wait_for(client.server_info(), timeout=2.0)
            return NodeLink(address, role, client, info)
        except (TimeoutError, GreenroomError) as exc:
            if loop.time() > end:
                await client.close()
                why = f"the {role} node at {address} did not answer within {wait_s:.0f} s"
                if keys is not None:  # a wrong server key looks like silence to the client
                    why += (
                        " (with CURVE: does --curve-peer-keys hold this node's public key, and "
                        "its --curve-authorized-keys the router's?)"
                    )
                raise ConfigError(why) from exc


@dataclass
class RouterNode:
    cfg: NodeConfig
    runtime: Runtime
    router: Router
    ref: ActorRef
    links: list[NodeLink]
    stopping: asyncio.Event

    @property
    def address(self) -> str:
        return self.router.bound_address

    @classmethod
    async def start(cls, cfg: NodeConfig, wait_s: float = NODE_WAIT_S) -> RouterNode:
        rc = cfg.router
        if not rc.context_nodes or not rc.generation_nodes:
            raise ConfigError("a router needs router.context_nodes and router.generation_nodes")
        security = client_socket_security(cfg)
        links: list[NodeLink] = []
        try:
            for role, addresses in (
                ("context", rc.context_nodes),
                ("generation", rc.generation_nodes),
            ):
                for address in addresses:
                    links.append(await _connect(cfg, address, role, wait_s))
            context = [link for link in links if link.role == "context"]
            generation = [link for link in links if link.role == "generation"]
            check_pairing(context, generation)
        except BaseException:
            await close_links(links)
            raise
        first = context[0].info
        max_len = min(link.info.max_model_len for link in links)
        info = msgspec.structs.replace(first, role="router", max_model_len=max_len)
        limits = FrontendLimits(max_model_len=max_len, vocab_size=first.vocab_size)
        tokenizer = None
        if cfg.model.path:
            from greenroom.node import _load_tokenizer

            tokenizer = _load_tokenizer(cfg.model.path)
            if tokenizer is not None:
                info = msgspec.structs.replace(info, has_tokenizer=True)
        router = Router(
            cfg.client_address,
            limits,
            info,
            context,
            generation,
            node_timeout_s=rc.node_timeout_s,
            request_timeout_s=cfg.scheduler.request_timeout_s,
            tokenizer=tokenizer,
            security=security,
            insecure=cfg.security.insecure,
        )
        rt = Runtime()
        try:
            ref = await rt.spawn(lambda: router, name="router", host="loop")
        except BaseException:
            await rt.shutdown(timeout=5.0)
            await close_links(links)
            raise
        log.info(
            "router ready",
            address=router.bound_address,
            context=list(rc.context_nodes),
            generation=list(rc.generation_nodes),
        )
        return cls(cfg, rt, router, ref, links, asyncio.Event())

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        await self.runtime.shutdown(timeout=timeout)
        await close_links(self.links)


async def serve_router(cfg: NodeConfig) -> int:
    node = await RouterNode.start(cfg)
    print(
        f"greenroom: routing {len(cfg.router.context_nodes)} context and "
        f"{len(cfg.router.generation_nodes)} generation nodes; clients connect to {node.address}",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, node.stopping.set)
    await node.stopping.wait()
    await node.stop()
    print("greenroom: stopped", flush=True)
    return 0


__all__ = ["RouterNode", "check_pairing", "serve_router"]
