#!/usr/bin/env python
"""Bus benchmark: greenroom actors vs a bare pyzmq (zmq.asyncio) + msgspec echo.

For each transport (inproc, ipc, tcp on loopback) and payload (a 1-token
TokenDelta, a 512-token SubmitRequest, a 16 MiB array) it measures the ask
round-trip latency (p50/p99) and the one-way throughput (messages/s: tells
followed by one flush ask) through the actor layer, and the same figures for a
bare ROUTER/DEALER echo written directly with zmq.asyncio and msgspec, in the
same run, on the same event loop implementation. For ipc and tcp the echo
server runs in its own process. Prints one JSON object as its last line;
`ratio_*` keys are greenroom / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio

from greenroom.actors import Runtime
from greenroom.actors.echo import Echo, EchoArray, EchoCount, EchoCounted
from greenroom.actors.loop_thread import new_event_loop
from greenroom.bus.messages import SamplingParams, SubmitRequest, TokenDelta

TRANSPORTS = ("inproc", "ipc", "tcp")
PAYLOADS = ("delta", "request", "array")
ARRAY_BYTES = 16 << 20


def make_payload(kind: str) -> Any:
    if kind == "delta":
        return TokenDelta(request_id="req-000001", token_ids=[42])
    if kind == "request":
        return SubmitRequest(
            request_id="req-000001",
            prompt_token_ids=list(range(1000, 1512)),
            sampling=SamplingParams(max_tokens=128),
        )
    return EchoArray(data=np.random.default_rng(0).integers(0, 255, ARRAY_BYTES, dtype=np.uint8))


def counts(kind: str, quick: bool) -> tuple[int, int]:
    """(round trips, one-way messages) per measurement."""
    if kind == "array":
        return (10, 10) if quick else (50, 100)
    return (1000, 5000) if quick else (10000, 50000)


# --------------------------------------------------------------------------- bare echo

_BARE_TYPES = TokenDelta | SubmitRequest


class BareCodec:
    """msgspec body + raw array frame, the way a hand-written service would do it."""

    def __init__(self) -> None:
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder(_BARE_TYPES)
        self.meta = msgspec.msgpack.Decoder(tuple)

    def encode(self, msg: Any) -> list[Any]:
        if isinstance(msg, EchoArray):
            arr = msg.data
            return [self.enc.encode((arr.dtype.str, arr.shape)), memoryview(arr).cast("B")]
        return [self.enc.encode(msg)]

    def decode(self, frames: list[zmq.Frame]) -> Any:
        if len(frames) == 2:
            dtype, shape = self.meta.decode(frames[0].buffer)
            return EchoArray(data=np.frombuffer(frames[1].buffer, dtype=dtype).reshape(shape))
        return self.dec.decode(frames[0].buffer)


async def bare_server(ctx: zmq.asyncio.Context, address: str, bound: asyncio.Future) -> None:
    codec = BareCodec()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(address)
    bound.set_result(sock.get(zmq.LAST_ENDPOINT).decode())
    received = 0
    try:
        while True:
            identity, kind, *payload = await sock.recv_multipart(copy=False)
            kind = kind.bytes
            if kind == b"stop":
                await sock.send_multipart([identity, b"stopped"])
                return
            if kind == b"count":
                await sock.send_multipart([identity, str(received).encode()])
                continue
            msg = codec.decode(payload)
            received += 1
            if kind == b"ask":
                await sock.send_multipart([identity, *codec.encode(msg)], copy=False)
    finally:
        sock.close(linger=0)


class BareClient:
    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.codec = BareCodec()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)

    async def ask(self, msg: Any) -> Any:
        await self.sock.send_multipart([b"ask", *self.codec.encode(msg)], copy=False)
        return self.codec.decode(await self.sock.recv_multipart(copy=False))

    async def tell(self, msg: Any) -> None:
        await self.sock.send_multipart([b"tell", *self.codec.encode(msg)], copy=False)

    async def count(self) -> int:
        await self.sock.send_multipart([b"count"])
        return int((await self.sock.recv_multipart())[0])

    async def stop_server(self) -> None:
        await self.sock.send_multipart([b"stop"])
        await self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(linger=0)


# --------------------------------------------------------------------------- servers in a process


def _serve_in_process(impl: str, address: str, conn: Any) -> None:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_serve(impl, address, conn))
    loop.close()


async def _serve(impl: str, address: str, conn: Any) -> None:
    if impl == "bare":
        ctx = zmq.asyncio.Context()
        bound = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(bare_server(ctx, address, bound))
        conn.send(await bound)
        await task
        ctx.term()
        return
    rt = Runtime()
    ref = await rt.spawn(Echo, name="echo")
    conn.send(await rt.expose(ref, address))
    await rt.cell("echo").wait_exit()  # stopped by the client's Stop (closed lifeline)
    await rt.shutdown()


class Server:
    """An echo server: in this loop for inproc, in a spawned process otherwise."""

    def __init__(self, impl: str, transport: str, ctx: zmq.asyncio.Context | None, rt) -> None:
        self.impl, self.transport, self.ctx, self.rt = impl, transport, ctx, rt
        self.proc: Any = None
        self.task: asyncio.Task | None = None
        self._tmp = tempfile.mkdtemp(prefix="gr-bench-")

    def _address(self) -> str:
        if self.transport == "inproc":
            return f"inproc://bench-{self.impl}"
        if self.transport == "ipc":
            return f"ipc://{self._tmp}/{self.impl}.sock"
        return "tcp://127.0.0.1:0"

    async def start(self) -> str:
        address = self._address()
        if self.transport == "inproc":
            if self.impl == "bare":
                bound = asyncio.get_running_loop().create_future()
                self.task = asyncio.ensure_future(bare_server(self.ctx, address, bound))
                return await bound
            ref = await self.rt.spawn(Echo, name="echo-inproc")
            return await self.rt.expose(ref, address)
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(
            target=_serve_in_process, args=(self.impl, address, child), daemon=True
        )
        self.proc.start()
        while not parent.poll():
            await asyncio.sleep(0.01)
        return parent.recv()

    async def stop(self) -> None:
        if self.task is not None:
            await asyncio.wait_for(self.task, 5.0)
        if self.proc is not None:
            self.proc.join(5.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        os.rmdir(self._tmp) if not os.listdir(self._tmp) else None


# --------------------------------------------------------------------------- measurement


ROUNDS = 5  # measurements alternate between the implementations, round by round


class Impl:
    """One implementation under test: ask, tell and a flush that returns the count."""

    def __init__(self, name: str, ask, tell, flush) -> None:
        self.name, self.ask, self.tell, self.flush = name, ask, tell, flush
        self.times: list[float] = []
        self.sent = 0
        self.elapsed = 0.0

    async def round_trips(self, msg: Any, n: int) -> None:
        clock = time.perf_counter
        for _ in range(n):
            start = clock()
            await self.ask(msg)
            self.times.append(clock() - start)

    async def one_way(self, msg: Any, n: int) -> None:
        base = await self.flush()
        start = time.perf_counter()
        for _ in range(n):
            await self.tell(msg)
        received = await self.flush()
        self.elapsed += time.perf_counter() - start
        self.sent += n
        if received - base != n:
            raise RuntimeError(f"{self.name}: sent {n}, the server counted {received - base}")

    def stats(self) -> dict[str, float]:
        times = sorted(self.times)
        return {
            "rt_p50_us": statistics.median(times) * 1e6,
            "rt_p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6,
            "msgs_per_s": self.sent / self.elapsed,
        }


async def compare(impls: list[Impl], msg: Any, n_rt: int, n_oneway: int) -> dict[str, dict]:
    for impl in impls:
        for _ in range(min(50, n_rt)):
            await impl.ask(msg)  # warm up
        impl.times, impl.sent, impl.elapsed = [], 0, 0.0
    for round_ in range(ROUNDS):
        order = impls if round_ % 2 == 0 else impls[::-1]
        for impl in order:
            await impl.round_trips(msg, max(1, n_rt // ROUNDS))
        for impl in order:
            await impl.one_way(msg, max(1, n_oneway // ROUNDS))
    return {impl.name: impl.stats() for impl in impls}


async def bench_transport(transport: str, quick: bool, payloads: dict[str, Any]) -> dict:
    actx = zmq.asyncio.Context()
    rt = Runtime()
    bare_server = Server("bare", transport, actx, None)
    gr_server = Server("greenroom", transport, None, rt)
    client = BareClient(actx, await bare_server.start())
    ref = await rt.connect(await gr_server.start())

    async def ask(msg: Any) -> Any:
        return await ref.ask(msg, timeout=30.0)

    async def flush() -> int:
        reply = await ref.ask(EchoCount(), timeout=60.0)
        assert isinstance(reply, EchoCounted)
        return reply.received

    impls = [
        Impl("bare", client.ask, client.tell, client.count),
        Impl("greenroom", ask, ref.tell, flush),
    ]
    results = {}
    for kind, msg in payloads.items():
        results[kind] = await compare(impls, msg, *counts(kind, quick))
    await client.stop_server()
    client.close()
    await bare_server.stop()
    actx.term()
    if gr_server.proc is not None:
        gr_server.proc.terminate()  # the process holds only an echo actor
    await rt.shutdown(timeout=5.0)
    await gr_server.stop()
    return results


async def bench_local(quick: bool, payloads: dict[str, Any]) -> dict[str, float]:
    """The in-process path actors on one node use: a local ref, no socket."""
    rt = Runtime()
    ref = await rt.spawn(Echo, name="echo-local")
    impl = Impl("local", lambda m: ref.ask(m, timeout=5.0), ref.tell, None)
    await impl.round_trips(payloads["delta"], 2000)
    await rt.shutdown()
    times = sorted(impl.times)
    return {"rt_p50_us": statistics.median(times) * 1e6}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    payloads = {kind: make_payload(kind) for kind in PAYLOADS}
    out: dict[str, Any] = {
        "bench": "bus",
        "quick": args.quick,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "array_bytes": ARRAY_BYTES,
    }
    for transport in args.transports:
        results = await bench_transport(transport, args.quick, payloads)
        for kind, by_impl in results.items():
            for impl, stats in by_impl.items():
                for key, value in stats.items():
                    out[f"{key}_{transport}_{kind}_{impl}"] = round(value, 1)
            g, b = by_impl["greenroom"], by_impl["bare"]
            out[f"ratio_rt_p50_{transport}_{kind}"] = round(g["rt_p50_us"] / b["rt_p50_us"], 3)
            out[f"ratio_throughput_{transport}_{kind}"] = round(
                g["msgs_per_s"] / b["msgs_per_s"], 3
            )
        out[f"ratio_rt_p50_{transport}"] = out[f"ratio_rt_p50_{transport}_delta"]
        out[f"ratio_throughput_{transport}"] = out[f"ratio_throughput_{transport}_delta"]
    local = await bench_local(args.quick, payloads)
    out["rt_p50_us_local_delta_greenroom"] = round(local["rt_p50_us"], 1)
    if "ipc" in args.transports:
        out["target_rt_p50_ipc_le_1_3"] = out["ratio_rt_p50_ipc"] <= 1.3
        out["target_throughput_ipc_ge_0_8"] = out["ratio_throughput_ipc"] >= 0.8
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 30 s)")
    parser.add_argument(
        "--transports",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(TRANSPORTS),
        help="comma-separated subset of inproc,ipc,tcp",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop for both implementations",
    )
    args = parser.parse_args(argv)
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports: {sorted(unknown)}")
    return args


if __name__ == "__main__":
    args = parse_args()
    loop = new_event_loop() if args.loop == "uvloop" else asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(main(args))
    finally:
        loop.close()
    sys.stdout.flush()
    print(json.dumps(result))
