"""Reliability: one request never hurts another, every wait ends, every failure is explicit.

Each test pins one finding of a hostile-user probe against a real node (tiny model, loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

import greenroom.actors.request_checks as request_checks
from greenroom.actors.engine import InjectFault
from greenroom.actors.request_checks import (
    SAMPLING_CHECKS,
    FrontendLimits,
    check_sampling,
    representable,
)
from greenroom.actors.runtime import clean_stale_ipc_dirs
from greenroom.bench.reliability import small_client_socket_buffers
from greenroom.bus.messages import ClientReply, EngineInfo, RequestError, SamplingParams
from greenroom.client import (
    AsyncClient,
    MalformedRequest,
    RequestFailed,
    RequestRejected,
    ServerUnavailable,
)
from greenroom.config import ConfigError, load_config
from greenroom.node import Node, fit_max_model_len

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
BYSTANDER_PROMPTS = [[1, 5, 9, 200], [7, 7, 7], list(range(10, 30)), [3, 1, 4, 1, 5]]


def node_config(**overrides):
    base = {"port": 0, "kv.num_blocks": 256, "scheduler.max_num_tokens": 64, "log_level": "error"}
    base.update(overrides)
    return load_config(overrides=base)


async def bystanders(client: AsyncClient, n: int = 8) -> list[list[int]]:
    results = await asyncio.gather(
        *(client.generate(BYSTANDER_PROMPTS[i % len(BYSTANDER_PROMPTS)], GREEDY) for i in range(n))
    )
    return [r.token_ids for r in results]


class RawClient:
    """A bare DEALER socket: sends whatever it is given."""

    def __init__(self, address: str, opts: dict | None = None) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for key, value in (opts or {}).items():
            self.sock.setsockopt(key, value)
        self.sock.connect(address)

    async def recv(self, timeout: float = 10.0) -> list:
        frame = await asyncio.wait_for(self.sock.recv(), timeout)
        return msgspec.msgpack.decode(frame, type=list[ClientReply])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


# ---------------------------------------------------------------------- 1. poison requests


def test_every_sampling_field_is_checked_against_what_the_engine_represents() -> None:
    limits = FrontendLimits(max_model_len=128, vocab_size=256)
    bad = [
        SamplingParams(top_k=2**63),
        SamplingParams(max_tokens=2**63),
        SamplingParams(temperature=float("inf")),
        SamplingParams(temperature=float("nan")),
        SamplingParams(top_p=float("nan")),
        SamplingParams(seed=-1),
        SamplingParams(seed=2**63),
        SamplingParams(stop_token_ids=[256]),
        SamplingParams(stop_token_ids=[-(2**63) - 1]),
        SamplingParams(logprobs=21),
    ]
    for s in bad:
        assert check_sampling(s, limits) is not None, s
    assert check_sampling(SamplingParams(top_k=10**6, seed=2**63 - 1), limits) is None
    # a field without a check of its own still passes the representability check
    assert representable([1, 2**64]) is not None and representable({1: float("inf")})
    assert set(SAMPLING_CHECKS) <= set(SamplingParams.__struct_fields__)


async def test_poison_values_get_typed_errors_and_bystanders_run() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            clean = await bystanders(client)
            for sampling, needle in [
                (SamplingParams(top_k=2**63), "top_k"),
                (SamplingParams(top_k=2**65), "encoded"),  # past msgpack: caught in the client
                (SamplingParams(temperature=float("inf")), "temperature"),
                (SamplingParams(seed=-3), "seed"),
                (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
            ]:
                with pytest.raises(RequestRejected, match=needle):
                    await client.generate([1, 2, 3], sampling)
            assert await bystanders(client) == clean
    finally:
        await node.stop()


async def test_a_step_failing_on_one_requests_data_fails_that_request_only(monkeypatch) -> None:
    """Defence in depth: with frontend validation off, the poison request reaches the engine;
    the step is re-run without it and the bystanders' greedy tokens are unchanged."""
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            clean = await bystanders(client)
            monkeypatch.setattr(request_checks, "check_sampling", lambda s, limits: None)
            poison = SamplingParams(max_tokens=8, logprobs=10**6)  # top-n past the vocabulary
            runs = []
            for _ in range(3):  # repeatedly: never counted as an engine crash
                tasks = [asyncio.ensure_future(bystanders(client))]
                with pytest.raises(RequestFailed, match="failed"):
                    await client.generate([1, 2, 3], poison)
                runs.append(await tasks[0])
            assert all(r == clean for r in runs)
        assert node.supervisor.restarts == 0
        await node.wait_blocks_free()
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 2. request-id lifecycle


async def test_request_ids_are_reusable_after_abort_and_error_and_scoped_per_client() -> None:
    node = await Node.start(node_config())
    try:
        async with (
            AsyncClient(node.address, timeout=30) as a,
            AsyncClient(node.address, timeout=30) as b,
        ):
            for _ in range(3):  # reuse right after an abort
                long = SamplingParams(max_tokens=500, ignore_eos=True)
                async with contextlib.aclosing(a.stream([1, 2, 3], long, request_id="x")) as s:
                    async for _delta in s:
                        break
            ok = await a.generate([1, 2, 3], GREEDY, request_id="x")
            assert len(ok.token_ids) == 8
            with pytest.raises(RequestRejected):  # reuse right after an error
                await a.generate([1, 2, 3], SamplingParams(top_p=2.0), request_id="y")
            assert len((await a.generate([1, 2, 3], GREEDY, request_id="y")).token_ids) == 8
            # b uses the same id at the same time, and cannot abort a's request
            long = asyncio.ensure_future(
                a.generate([5, 6], SamplingParams(max_tokens=40, ignore_eos=True), request_id="z")
            )
            await asyncio.sleep(0.05)
            await b.abort("z")
            assert len((await b.generate([5, 6], GREEDY, request_id="z")).token_ids) == 8
            assert len((await long).token_ids) == 40
        await node.wait_blocks_free()
        await asyncio.sleep(0.1)
        assert node.frontend.in_flight() == 0
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 3. slow readers


async def test_a_slow_reader_gets_every_final_message() -> None:
    with small_client_socket_buffers(hwm=2, sndbuf=4096):
        node = await Node.start(node_config(**{"scheduler.max_num_tokens": 256}))
    try:
        raw = RawClient(node.address, {zmq.RCVHWM: 2, zmq.RCVBUF: 4096})
        n, max_tokens = 16, 100
        for i in range(n):
            req = {
                "type": "GenerateRequest",
                "request_id": f"r{i}",
                "prompt_token_ids": [1, 2, 3 + i],
                "sampling": {"max_tokens": max_tokens, "ignore_eos": True, "logprobs": 20},
            }
            await raw.sock.send(msgspec.msgpack.encode(req))
        for _ in range(600):  # not reading until the server meets a full socket
            if node.frontend.stats["backpressure"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        tokens: dict[str, int] = {}
        finals: set[str] = set()
        while len(finals) < n:
            for item in await raw.recv():
                assert not isinstance(item, RequestError), item
                tokens[item.request_id] = tokens.get(item.request_id, 0) + len(item.token_ids)
                if item.finish_reason is not None:
                    finals.add(item.request_id)
        raw.close()
        assert all(tokens[f"r{i}"] == max_tokens for i in range(n))
        assert node.frontend.stats["backpressure"] > 0
        assert node.frontend.stats["disconnected"] == 0
        await node.wait_blocks_free()
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 4. size caps, 7. malformed


async def test_size_caps_and_malformed_frames_get_typed_errors() -> None:
    node = await Node.start(node_config(**{"frontend.max_message_bytes": 65536}))
    try:
        async with AsyncClient(node.address, timeout=30) as client:
            with pytest.raises(RequestRejected, match="request_id"):
                await client.generate([1, 2], GREEDY, request_id="i" * 1000)
            with pytest.raises(RequestRejected, match="bytes"):  # checked before sending
                await client.generate([300] * 40_000, GREEDY)
            raw = RawClient(node.address)
            await raw.sock.send(b"\xc1 not msgpack")
            (reply,) = await raw.recv()
            assert reply.kind == "malformed" and reply.request_id == ""
            assert MalformedRequest("m").kind == "malformed"
            await raw.sock.send_multipart([b"a", b"b"])  # two frames
            assert (await raw.recv())[0].kind == "malformed"
            await raw.sock.send(b"\x00" * 1_000_000)  # past the cap: the peer is dropped
            with pytest.raises(TimeoutError):
                await raw.recv(timeout=1.0)
            raw.close()
            assert len((await client.generate([1, 2], GREEDY)).token_ids) == 8
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 5. KV pool too small


def test_max_model_len_is_lowered_to_what_the_pool_holds() -> None:
    info = EngineInfo(
        num_blocks=8,
        tokens_per_block=16,
        max_model_len=2048,
        vocab_size=256,
        eos_token_ids=[],
        device="cpu",
        model_name="t",
    )
    assert fit_max_model_len(info).max_model_len == 7 * 16
    with pytest.raises(ConfigError, match="num_blocks"):
        fit_max_model_len(msgspec.structs.replace(info, num_blocks=1))


async def test_requests_that_can_never_fit_the_pool_are_refused_and_others_finish() -> None:
    node = await Node.start(node_config(**{"kv.num_blocks": 8}))
    try:
        async with AsyncClient(node.address, timeout=30) as client:
            with pytest.raises(RequestRejected, match="210 tokens"):
                await client.generate(list(range(1, 11)), SamplingParams(max_tokens=200))
            # two requests that each need most of the pool: preemption, then both finish
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        client.generate(
                            list(range(1, 11)), SamplingParams(max_tokens=90, ignore_eos=True)
                        )
                        for _ in range(2)
                    )
                ),
                60,
            )
            assert [len(r.token_ids) for r in results] == [90, 90]
        await node.wait_blocks_free()
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 6. liveness


async def test_no_server_fails_fast_with_server_unavailable() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ServerUnavailable, match="no greenroom server"):
        async with AsyncClient("tcp://127.0.0.1:9", connect_timeout=0.5):
            pass
    client = AsyncClient("tcp://127.0.0.1:9", connect_timeout=0.5)
    with pytest.raises(ServerUnavailable):
        await client.generate([1, 2], GREEDY)
    await client.close()
    assert loop.time() - start < 5


async def test_open_streams_fail_within_seconds_when_the_server_goes_away() -> None:
    node = await Node.start(node_config())
    client = AsyncClient(node.address, timeout=600, heartbeat_s=0.2)
    await client.start()
    try:
        task = asyncio.ensure_future(
            client.generate([1, 2, 3], SamplingParams(max_tokens=2000, ignore_eos=True))
        )
        await asyncio.sleep(0.3)
        # the server vanishes without a word (as after kill -9): its socket just closes
        node.frontend._channel.close()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ServerUnavailable, match="lost the connection"):
            await task
        assert loop.time() - start < 5
    finally:
        await client.close()
        await node.stop()


async def test_a_client_stops_its_monitor_before_the_monitor_reader_closes() -> None:
    """A socket closed under a monitor whose reader is gone blocks a ZeroMQ thread of the
    shared context sending it the close event, and every later socket of the process stalls:
    the monitor task, however it ends, disables the monitor before closing its reader."""
    node = await Node.start(node_config())
    client = AsyncClient(node.address, timeout=60)
    await client.start()
    try:
        sock, order = client._sock, []
        assert sock is not None and client._monitor is not None
        disable = sock.disable_monitor
        sock.disable_monitor = lambda: (order.append("disabled"), disable())[1]
        # the reader side closes in the task's finally: record when
        frame = client._monitor.get_coro().cr_frame
        monitor = frame.f_locals["monitor"] if frame is not None else None
        assert monitor is not None
        close = monitor.close
        monitor.close = lambda linger=None: (order.append("reader closed"), close(linger=linger))[1]
        client._monitor.cancel()  # as when a client vanishes mid-stream
        with contextlib.suppress(asyncio.CancelledError):
            await client._monitor
        assert order == ["disabled", "reader closed"]
        # the connection still serves: the socket itself is untouched
        assert await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
    finally:
        await client.close()
        await node.stop()


# ---------------------------------------------------------------------- 8. restart limit, 9. clean stop


async def test_the_restart_limit_stops_the_node_with_a_failure() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=30) as client:
            for _ in range(10):
                if node.stopping.is_set():
                    break
                await node.refs["mixed"].tell(InjectFault(reason="test crash"))
                with pytest.raises((RequestFailed, ServerUnavailable)):
                    await client.generate([1, 2, 3], SamplingParams(max_tokens=50))
                await asyncio.sleep(0.2)
        await asyncio.wait_for(node.stopping.wait(), 30)
        assert node.failure is not None and "crashed more than" in node.failure
    finally:
        await node.stop()


async def test_a_clean_stop_with_requests_in_flight_logs_no_error() -> None:
    loop = asyncio.get_running_loop()
    errors: list = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    node = await Node.start(node_config())
    async with AsyncClient(node.address, timeout=30) as client:
        tasks = [
            asyncio.ensure_future(
                client.generate([1, 2, 3], SamplingParams(max_tokens=2000, ignore_eos=True))
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.3)
        await node.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RequestFailed) for r in results)
    import gc

    gc.collect()
    await asyncio.sleep(0.05)
    assert errors == []


# ---------------------------------------------------------------------- 10. leaving on the final delta


async def test_breaking_on_the_final_delta_frees_the_id_and_sends_no_abort() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=30) as client:
            async for delta in client.stream([1, 2, 3], GREEDY, request_id="f"):
                if delta.finish_reason is not None:
                    break
            assert "f" not in client._queues
            assert len((await client.generate([1, 2, 3], GREEDY, request_id="f")).token_ids) == 8
        await asyncio.sleep(0.1)
        assert node.frontend.stats["aborts"] == 0
    finally:
        await node.stop()


# ---------------------------------------------------------------------- 11. files


def test_shards_outside_the_model_directory_are_refused(tmp_path: Path) -> None:
    from greenroom.config import KVConfig, ModelConfig
    from greenroom.models import CheckpointError, ModelRunner
    from greenroom.models.tiny import tiny_llama_dir

    ckpt = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir(), ckpt)
    (tmp_path / "elsewhere.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    for shard in ["../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")]:
        index = {"weight_map": {"model.embed_tokens.weight": shard}}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside the model directory"):
            ModelRunner(ModelConfig(), KVConfig(num_blocks=8), ckpt, "cpu")


def test_stale_socket_folders_are_cleaned(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = tmp_path / f"greenroom-{dead.stdout.strip()}-abc"
    stale.mkdir()
    (stale / "engine.sock").write_bytes(b"")
    live = tmp_path / f"greenroom-{os.getpid()}-abc"
    live.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    assert clean_stale_ipc_dirs(str(tmp_path)) == [str(stale)]
    assert live.exists() and other.exists() and not stale.exists()


# ---------------------------------------------------------------------- security


async def test_curve_lets_in_only_clients_with_an_authorized_key(tmp_path: Path) -> None:
    from greenroom.bus.security import make_key_pair

    make_key_pair(tmp_path / "server", "server")
    make_key_pair(tmp_path / "clients", "alice")
    make_key_pair(tmp_path / "other", "mallory")
    cfg = node_config(
        **{
            "security.curve_secret_key": str(tmp_path / "server" / "server.key_secret"),
            "security.curve_authorized_keys": str(tmp_path / "clients"),
        }
    )
    node = await Node.start(cfg)
    try:
        server_key = str(tmp_path / "server" / "server.key")
        async with AsyncClient(
            node.address,
            server_key=server_key,
            client_key=str(tmp_path / "clients" / "alice.key_secret"),
        ) as alice:
            assert len((await alice.generate([1, 2, 3], GREEDY)).token_ids) == 8
        for kw in (
            {
                "server_key": server_key,
                "client_key": str(tmp_path / "other" / "mallory.key_secret"),
            },
            {},  # no keys at all
        ):
            with pytest.raises(ServerUnavailable):
                async with AsyncClient(node.address, connect_timeout=1.5, **kw):
                    pass
        assert node.frontend.stats["submitted"] == 1
    finally:
        await node.stop()


def test_a_non_loopback_bind_needs_keys_or_insecure() -> None:
    from greenroom.bus.security import SecurityError, check_bind

    with pytest.raises(SecurityError, match="greenroom keys"):
        check_bind("0.0.0.0", has_keys=False, insecure=False)
    check_bind("0.0.0.0", has_keys=False, insecure=True)
    check_bind("10.1.2.3", has_keys=True, insecure=False)
    check_bind("127.0.0.1", has_keys=False, insecure=False)
    check_bind("localhost", has_keys=False, insecure=False)
