"""End to end through real sockets: a node on the tiny model, the client library, real errors."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from greenroom.actors.engine import InjectFault
from greenroom.bus.messages import ClientReply, RequestError, SamplingParams
from greenroom.client import AsyncClient, Overloaded, RequestFailed, RequestRejected, RequestTimeout
from greenroom.config import load_config
from greenroom.node import Node

pytestmark = pytest.mark.slow

PROMPTS = [
    [1, 5, 9, 200],
    [7] * 3,
    list(range(10, 50)),
    [3, 1, 4, 1, 5, 9, 2, 6],
    list(range(100, 171)),
]


def node_config(**overrides):
    base = {"port": 0, "kv.num_blocks": 256, "scheduler.max_num_tokens": 64, "log_level": "warning"}
    base.update(overrides)
    return load_config(overrides=base)


@pytest.fixture(scope="module")
def reference_tokens() -> dict[int, list[int]]:
    """transformers greedy decoding on the same embedded tiny checkpoint (the oracle)."""
    import torch
    from transformers import AutoModelForCausalLM

    from greenroom.models.tiny import tiny_llama_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), torch_dtype=torch.float32)
    model.eval()
    out = {}
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out[i] = gen[0, len(prompt) :].tolist()
    return out


@pytest.mark.parametrize("engine_host", ["thread", "process"])
async def test_concurrent_streams_match_transformers(engine_host, reference_tokens) -> None:
    node = await Node.start(
        node_config(engine_host=engine_host, **{"kv.enable_prefix_reuse": False})
    )
    try:
        async with AsyncClient(node.address, timeout=60) as client:

            async def one(i: int) -> list[int]:
                tokens: list[int] = []
                async for delta in client.stream(
                    PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=12, ignore_eos=True)
                ):
                    tokens.extend(delta.token_ids)
                    if delta.finish_reason:
                        assert delta.finish_reason == "length"
                        assert delta.metrics.num_output_tokens == 12
                return tokens

            results = await asyncio.gather(*(one(i) for i in range(20)))
        for i, tokens in enumerate(results):
            assert tokens == reference_tokens[i % len(PROMPTS)], f"request {i}"
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_abort_and_disconnect_free_blocks() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            got = 0
            async for delta in client.stream(
                list(range(1, 40)), SamplingParams(max_tokens=500, ignore_eos=True)
            ):
                got += len(delta.token_ids)
                if got >= 3:
                    break  # leaving the stream aborts the request
        await node.wait_blocks_free()

        client = AsyncClient(node.address, timeout=60)
        client.connect()
        agen = client.stream(list(range(1, 40)), SamplingParams(max_tokens=500, ignore_eos=True))
        await agen.__anext__()
        # vanish without aborting: close the socket under the stream
        client._sock.close(linger=0)
        client._closed = True
        client._reader.cancel()
        await node.wait_blocks_free(timeout=10)
        assert node.frontend.in_flight() == 0
    finally:
        await node.stop()


async def test_bad_inputs_get_errors_while_others_finish() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            good = asyncio.ensure_future(
                client.generate([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
            )
            bad_cases = [
                ([], SamplingParams(), "empty"),
                (list(range(1, 5000)), SamplingParams(), "max_model_len"),
                ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
                ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
                ([1, 2], SamplingParams(top_p=0.0), "top_p"),
                ([1, 2], SamplingParams(top_p=1.5), "top_p"),
                ([1, 2], SamplingParams(top_k=0), "top_k"),
                ([1, 2], SamplingParams(top_k=-2), "top_k"),
                ([10**9], SamplingParams(), "vocabulary"),
            ]
            for prompt, sampling, needle in bad_cases:
                with pytest.raises(RequestRejected, match=needle):
                    await client.generate(prompt, sampling)

            # duplicate request id while the first is running
            first = asyncio.ensure_future(
                client.generate(
                    [5, 6], SamplingParams(max_tokens=40, ignore_eos=True), request_id="dup"
                )
            )
            await asyncio.sleep(0.05)
            other = AsyncClient(node.address, timeout=10)
            async with other:  # ids are scoped per client: another client may use it
                assert len((await other.generate([5, 6], request_id="dup")).token_ids) == 16
            assert len((await first).token_ids) == 40

            # unknown field, sent raw
            ctx = zmq.asyncio.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.connect(node.address)
            raw = {
                "type": "GenerateRequest",
                "request_id": "raw1",
                "prompt_token_ids": [1],
                "bogus": 1,
            }
            await sock.send(msgspec.msgpack.encode(raw))
            reply = msgspec.msgpack.decode(
                await asyncio.wait_for(sock.recv(), 5), type=list[ClientReply]
            )
            assert isinstance(reply[0], RequestError) and reply[0].kind == "invalid"
            assert "bogus" in reply[0].message
            await sock.send(b"\xc1 not msgpack")  # malformed: a typed error, the frontend lives on
            reply = msgspec.msgpack.decode(
                await asyncio.wait_for(sock.recv(), 5), type=list[ClientReply]
            )
            assert reply[0].kind == "malformed"
            sock.close(linger=0)
            ctx.term()

            result = await good
            assert len(result.token_ids) == 30 and result.finish_reason == "length"
            again = await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
            assert len(again.token_ids) == 2
    finally:
        await node.stop()


async def test_overloaded_when_the_queue_is_full() -> None:
    cfg = node_config(**{"scheduler.max_num_active_requests": 1, "scheduler.max_queue_size": 2})
    node = await Node.start(cfg)
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            tasks = [
                asyncio.ensure_future(
                    client.generate([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True))
                )
                for _ in range(12)
            ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
        overloaded = [r for r in results if isinstance(r, Overloaded)]
        done = [r for r in results if not isinstance(r, BaseException)]
        assert overloaded and done
        assert len(overloaded) + len(done) == 12
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_engine_crash_fails_inflight_then_recovers() -> None:
    node = await Node.start(node_config())
    try:
        async with AsyncClient(node.address, timeout=60) as client:
            running = [
                asyncio.ensure_future(
                    client.generate([1, 2, 3, 4], SamplingParams(max_tokens=400, ignore_eos=True))
                )
                for _ in range(3)
            ]
            await asyncio.sleep(0.2)
            await node.refs["mixed"].tell(InjectFault(reason="test crash"))
            results = await asyncio.gather(*running, return_exceptions=True)
            assert all(isinstance(r, RequestFailed) for r in results), results
            # the supervisor restarted the engine: new work succeeds
            ok = await client.generate([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
            assert len(ok.token_ids) == 5
        await node.wait_blocks_free()
    finally:
        await node.stop()


async def test_shutdown_fails_inflight_requests_with_an_error() -> None:
    node = await Node.start(node_config())
    async with AsyncClient(node.address, timeout=30) as client:
        task = asyncio.ensure_future(
            client.generate([1, 2, 3], SamplingParams(max_tokens=2000, ignore_eos=True))
        )
        await asyncio.sleep(0.2)
        await node.stop()
        with pytest.raises(RequestFailed, match="shutting down"):
            await task


async def test_requests_past_their_deadline_end_with_a_timeout_error() -> None:
    node = await Node.start(node_config(**{"scheduler.request_timeout_s": 0.1}))
    try:
        async with AsyncClient(node.address, timeout=30) as client:
            with pytest.raises(RequestTimeout, match="timeout"):
                await client.generate([1, 2, 3], SamplingParams(max_tokens=2000, ignore_eos=True))
            ok = await client.generate([1, 2, 3], SamplingParams(max_tokens=3))
            assert len(ok.token_ids) == 3
        await node.wait_blocks_free()
    finally:
        await node.stop()
