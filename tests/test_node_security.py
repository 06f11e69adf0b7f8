"""CURVE on node-to-node sockets: a group head's rank bus (node agents, rank workers) and a
router's links to its context and generation nodes; loopback with keys forced on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from greenroom.bus.codec import encode
from greenroom.bus.security import ClientKeys, load_key_pair, load_public_key, make_key_pair
from greenroom.bus.transport import Transport, new_context
from greenroom.config import ConfigError, load_config
from greenroom.node_security import client_socket_security, peer_client_keys
from greenroom.parallel import messages as m
from greenroom.parallel.head import rank_bus_address, rank_bus_security
from greenroom.parallel.hub import RankHub
from greenroom.parallel.layout import RankLayout


def _keys(tmp_path: Path) -> dict[str, Path]:
    """Key pairs head, agent (listed as a peer), mallory (not listed), client."""
    out = {}
    for name in ("head", "agent", "mallory", "client"):
        out[name] = make_key_pair(tmp_path / name, name)[1]
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "agent.key").write_bytes((tmp_path / "agent" / "agent.key").read_bytes())
    return out


def _security(tmp_path: Path, keys: dict[str, Path], **extra) -> dict:
    return {
        "security.curve_secret_key": str(keys["head"]),
        "security.curve_authorized_keys": str(tmp_path / "client" / "client.key"),
        "security.curve_peer_keys": str(tmp_path / "peers"),
        **extra,
    }


async def test_the_rank_bus_lets_in_only_listed_peers(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    cfg = load_config(
        overrides=_security(
            tmp_path,
            keys,
            **{"parallel.tp_size": 2, "parallel.nnodes": 2, "parallel.master_port": 29000},
        )
    )
    bind, _ = rank_bus_address(cfg, "ipc://unused")
    assert bind == "tcp://127.0.0.1:29001"  # a loopback master binds loopback only
    security = rank_bus_security(cfg, "tcp://127.0.0.1:0")
    assert security is not None  # keys given: CURVE on loopback too
    ctx = new_context()
    transport = Transport(ctx)
    hub = RankHub(transport, RankLayout(tp_size=2, nnodes=2), "tcp://127.0.0.1:0", None, security)
    heard: list = []
    hub.listener = heard.append
    head_public = load_public_key(tmp_path / "head" / "head.key")

    def dealer(name: str | None, identity: bytes | None = None):
        keys_ = None
        if name is not None:
            keys_ = ClientKeys(head_public, *load_key_pair(keys[name]))
        ch = transport.connect_dealer(hub.address, lambda frames: None, keys_)
        if identity is not None:
            ch._sock.setsockopt(zmq.IDENTITY, identity)  # before the handshake, as a worker
        return ch

    try:
        hello = m.AgentHello(node_rank=1, nnodes=2, world_size=2, host="x")
        for name in ("mallory", None):  # an unlisted key, no key at all
            await dealer(name).send(encode(hello))
            await dealer(name).send(encode(m.RankHello(epoch=1, rank=1, pid=1, host="x")))
        await asyncio.sleep(0.5)
        assert hub.agents == {} and heard == []  # refused in the handshake: nothing arrived
        await dealer("agent").send(encode(hello))
        await dealer("head").send(encode(m.RankHello(epoch=1, rank=0, pid=1, host="x")))
        for _ in range(100):
            if hub.agents and heard:
                break
            await asyncio.sleep(0.02)
        assert list(hub.agents) == [1]
        assert [type(msg) for msg in heard] == [m.RankHello]
    finally:
        hub.close()
        transport.close()
        ctx.term()


def test_a_rank_bus_beyond_loopback_needs_keys_or_insecure(tmp_path: Path) -> None:
    multi = {
        "parallel.tp_size": 2,
        "parallel.nnodes": 2,
        "parallel.master_addr": "10.0.0.1",
        "parallel.master_port": 29500,
    }
    cfg = load_config(overrides=multi)
    bind, address = rank_bus_address(cfg, "ipc://unused")
    assert (bind, address) == ("tcp://*:29501", "tcp://10.0.0.1:29501")
    with pytest.raises(ConfigError, match="the rank bus .*--curve-peer-keys") as err:
        rank_bus_security(cfg, bind)
    assert "\n" not in str(err.value)
    assert (
        rank_bus_security(load_config(overrides={**multi, "security.insecure": True}), bind) is None
    )
    keys = _keys(tmp_path)
    assert rank_bus_security(load_config(overrides={**multi, **_security(tmp_path, keys)}), bind)
    # one node: the rank bus is an ipc socket, no keys needed
    assert rank_bus_security(load_config(overrides={"parallel.tp_size": 2}), "ipc://x") is None
    # keys for the client socket alone do not open a non-loopback rank bus
    client_only = {k: v for k, v in _security(tmp_path, keys).items() if "peer" not in k}
    with pytest.raises(ConfigError, match="the rank bus"):
        rank_bus_security(load_config(overrides={**multi, **client_only}), bind)


def test_a_router_beyond_loopback_needs_keys_and_peer_keys_must_be_readable(
    tmp_path: Path,
) -> None:
    router = {
        "role": "router",
        "host": "0.0.0.0",
        "router.context_nodes": ["tcp://10.0.0.2:7700"],
        "router.generation_nodes": ["tcp://10.0.0.3:7700"],
    }
    with pytest.raises(ConfigError, match="greenroom keys"):
        client_socket_security(load_config(overrides=router))
    keys = _keys(tmp_path)
    cfg = load_config(overrides={**router, **_security(tmp_path, keys)})
    # the peers directory holds one key: every node is expected to serve it
    assert peer_client_keys(cfg, "tcp://10.0.0.2:7700").server_public_key == load_public_key(
        tmp_path / "peers" / "agent.key"
    )
    peers = tmp_path / "peers"
    (peers / "10.0.0.3_7700.key").write_bytes((tmp_path / "mallory" / "mallory.key").read_bytes())
    (peers / "10.0.0.2.key").write_bytes((tmp_path / "client" / "client.key").read_bytes())
    mallory = load_public_key(tmp_path / "mallory" / "mallory.key")
    assert peer_client_keys(cfg, "tcp://10.0.0.3:7700").server_public_key == mallory
    client = load_public_key(tmp_path / "client" / "client.key")
    assert peer_client_keys(cfg, "tcp://10.0.0.2:7700").server_public_key == client
    with pytest.raises(ConfigError, match=r"10\.0\.0\.4_7700\.key or 10\.0\.0\.4\.key"):
        peer_client_keys(cfg, "tcp://10.0.0.4:7700")
    missing = {**router, **_security(tmp_path, keys), "security.curve_peer_keys": "/nonexistent"}
    with pytest.raises(ConfigError, match="does not exist"):
        peer_client_keys(load_config(overrides=missing), "tcp://10.0.0.2:7700")
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    bad = {**router, **_security(tmp_path, keys), "security.curve_peer_keys": str(broken)}
    with pytest.raises(ConfigError, match="cannot read a CURVE key"):
        peer_client_keys(load_config(overrides=bad), "tcp://10.0.0.2:7700")
    with pytest.raises(ConfigError, match="curve_peer_keys is invalid without curve_secret_key"):
        load_config(overrides={"security.curve_peer_keys": str(peers)})


@pytest.mark.slow
async def test_a_router_serves_through_nodes_it_lists_and_refuses_others(tmp_path: Path) -> None:
    from disagg_cluster import start, start_router

    from greenroom.bus.messages import SamplingParams
    from greenroom.client import AsyncClient
    from greenroom.router import RouterNode

    names = ("context", "generation", "router", "client", "mallory")
    pairs = {n: make_key_pair(tmp_path / n, n) for n in names}
    node_keys = {  # the nodes let the router in as their client
        "security.curve_authorized_keys": str(pairs["router"][0]),
    }
    ctx = await start(
        "context", **{"security.curve_secret_key": str(pairs["context"][1])}, **node_keys
    )
    gen = await start(
        "generation", **{"security.curve_secret_key": str(pairs["generation"][1])}, **node_keys
    )
    peers = tmp_path / "peers"
    peers.mkdir()

    def list_peer(node, key: Path) -> None:
        name = node.address.removeprefix("tcp://").replace(":", "_")
        (peers / f"{name}.key").write_bytes(key.read_bytes())

    router_keys = {
        "security.curve_secret_key": str(pairs["router"][1]),
        "security.curve_authorized_keys": str(pairs["client"][0]),
        "security.curve_peer_keys": str(peers),
    }
    try:
        list_peer(ctx, pairs["context"][0])
        list_peer(gen, pairs["mallory"][0])  # the generation node serves a key not listed
        with pytest.raises(ConfigError, match="generation node .*did not answer.*CURVE"):
            await RouterNode.start(
                load_config(
                    overrides={
                        "port": 0,
                        "role": "router",
                        "log_level": "warning",
                        "router.context_nodes": [ctx.address],
                        "router.generation_nodes": [gen.address],
                        **router_keys,
                    }
                ),
                wait_s=3.0,
            )
        assert gen.frontend.stats["submitted"] == 0
        list_peer(gen, pairs["generation"][0])
        router = await start_router([ctx.address], [gen.address], **router_keys)
        try:
            async with AsyncClient(
                router.address,
                server_key=str(pairs["router"][0]),
                client_key=str(pairs["client"][1]),
            ) as client:
                result = await client.generate([5, 6, 7, 8], SamplingParams(max_tokens=4))
            assert len(result.token_ids) == 4
        finally:
            await router.stop()
    finally:
        await ctx.stop()
        await gen.stop()


async def test_the_transport_refuses_a_plain_bind_beyond_loopback() -> None:
    from greenroom.bus.security import SecurityError

    ctx = new_context()
    transport = Transport(ctx)
    try:
        for address in ("tcp://0.0.0.0:0", "tcp://*:0", "tcp://10.1.2.3:5555"):
            with pytest.raises(SecurityError, match="without CURVE keys"):
                transport.bind_router(address)
            with pytest.raises(SecurityError, match="without CURVE keys"):
                transport.bind(zmq.PUB, address)
        assert transport.bind_router("tcp://127.0.0.1:0").address.startswith("tcp://127.0.0.1:")
    finally:
        transport.close()
        ctx.term()
