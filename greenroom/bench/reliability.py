"""Chaos suite: faults against real nodes, each with bystanders whose greedy tokens must match
a clean run.

Every scenario reports: requests, hung (no final message or error within the deadline),
explicit errors, bystanders correct (fraction matching the clean run), leaked KV blocks and
frontend entries once the dust settles, whether the server is alive after, and the seconds
from the fault until every affected client knew. The goal, every scenario: 0 hung, 0 leaked,
all bystanders correct, every affected request ends with an explicit error within 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import msgspec
import zmq
import zmq.asyncio

from greenroom.bus.messages import ClientReply, RequestError, SamplingParams
from greenroom.client import AsyncClient, GreenroomError, RequestFailed, ServerUnavailable
from greenroom.config import load_config
from greenroom.node import Node

DEADLINE_S = 10.0  # an affected request must know within this
BYSTANDER_PROMPTS = [[1, 5, 9, 200], [7, 7, 7], list(range(10, 30)), [3, 1, 4, 1, 5, 9, 2, 6]]


@dataclass
class Scale:
    clients: int  # vanishing clients, slow readers' requests, fuzz frames (scaled)
    bystanders: int
    max_tokens: int
    long_tokens: int  # of the requests a fault hits

    @classmethod
    def of(cls, quick: bool) -> Scale:
        return cls(8, 4, 8, 200) if quick else cls(64, 16, 16, 400)


@dataclass
class ScenarioResult:
    name: str
    requests: int = 0
    hung: int = 0
    explicit_errors: int = 0
    bystanders: int = 0
    bystanders_correct: int = 0
    leaked_kv_blocks: int = 0
    leaked_frontend_entries: int = 0
    server_alive: bool = True
    seconds_to_know: float = 0.0
    notes: str = ""

    @property
    def bystanders_correct_fraction(self) -> float:
        return self.bystanders_correct / self.bystanders if self.bystanders else 1.0

    @property
    def passed(self) -> bool:
        return (
            self.hung == 0
            and self.leaked_kv_blocks == 0
            and self.leaked_frontend_entries == 0
            and self.bystanders_correct == self.bystanders
            and self.seconds_to_know <= DEADLINE_S
        )

    def row(self) -> dict:
        d = asdict(self)
        d["bystanders_correct_fraction"] = round(self.bystanders_correct_fraction, 4)
        d["seconds_to_know"] = round(self.seconds_to_know, 3)
        d["passed"] = self.passed
        return d


@dataclass
class Outcome:
    """How one request ended: tokens, the error, or nothing within the deadline (hung)."""

    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    hung: bool = False
    ended_at: float = 0.0


async def run_request(
    client: AsyncClient, prompt: list[int], sampling: SamplingParams, deadline_s: float
) -> Outcome:
    out = Outcome()
    try:
        async with asyncio.timeout(deadline_s):
            async for delta in client.stream(prompt, sampling):
                out.tokens.extend(delta.token_ids)
    except TimeoutError:
        out.hung = True
    except GreenroomError as exc:
        out.error = exc
    out.ended_at = time.monotonic()
    return out


class Bystanders:
    """Greedy requests run beside a fault; their tokens are compared with a clean run."""

    def __init__(self, reference: dict[int, list[int]], scale: Scale) -> None:
        self.reference = reference
        self.scale = scale

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.scale.max_tokens, ignore_eos=True)

    async def run(self, address: str, deadline_s: float = 120.0) -> tuple[int, int, int]:
        """(bystanders, correct, hung)."""
        async with AsyncClient(address, timeout=deadline_s) as client:
            outs = await asyncio.gather(
                *(
                    run_request(
                        client,
                        BYSTANDER_PROMPTS[i % len(BYSTANDER_PROMPTS)],
                        self.sampling(),
                        deadline_s,
                    )
                    for i in range(self.scale.bystanders)
                )
            )
        correct = sum(
            o.error is None and o.tokens == self.reference[i % len(BYSTANDER_PROMPTS)]
            for i, o in enumerate(outs)
        )
        return len(outs), correct, sum(o.hung for o in outs)


async def reference_tokens(address: str, scale: Scale) -> dict[int, list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        sampling = SamplingParams(max_tokens=scale.max_tokens, ignore_eos=True)
        results = [await client.generate(p, sampling) for p in BYSTANDER_PROMPTS]
    return {i: r.token_ids for i, r in enumerate(results)}


async def settle(node: Node, res: ScenarioResult, timeout: float = 15.0) -> None:
    """Leaks once every request had time to end; whether the node still serves."""
    with contextlib.suppress(TimeoutError):
        await node.wait_blocks_free(timeout=timeout)
    stats = await node.kv_stats()
    res.leaked_kv_blocks = stats.total_blocks - stats.free_blocks
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while node.frontend.in_flight() and loop.time() < end:
        await asyncio.sleep(0.05)
    res.leaked_frontend_entries = node.frontend.in_flight()
    try:
        async with AsyncClient(node.address, timeout=30, connect_timeout=5) as client:
            await client.generate([1, 2, 3], SamplingParams(max_tokens=2))
        res.server_alive = True
    except GreenroomError:
        res.server_alive = False


def _long(scale: Scale) -> SamplingParams:
    return SamplingParams(max_tokens=scale.long_tokens, ignore_eos=True)


@contextlib.contextmanager
def small_client_socket_buffers(hwm: int = 4, sndbuf: int = 8192):
    """Client-facing (tcp) sockets bound meanwhile get tiny send buffers, so a client that
    stops reading meets a full socket within a few messages (a test of backpressure)."""
    from greenroom.bus.transport import Transport

    original = Transport._bind_socket

    def bind(self, sock, address, on_frames):
        if address.startswith("tcp://"):
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.SNDBUF, sndbuf)
        return original(self, sock, address, on_frames)

    Transport._bind_socket = bind
    try:
        yield
    finally:
        Transport._bind_socket = original


# --------------------------------------------------------------------------- scenarios


async def engine_kill(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """kill -9 of the engine process mid-stream: its requests fail, a new engine serves."""
    res = ScenarioResult("engine_kill_9")
    entry = node.runtime.cell("engine")
    pid = getattr(entry, "pid", None)
    if pid is None:
        res.notes = "engine is not a process"
        return res
    restarts = node.supervisor.restarts
    async with AsyncClient(node.address, timeout=120) as client:
        endless = SamplingParams(max_tokens=1500, ignore_eos=True)
        tasks = [
            asyncio.ensure_future(run_request(client, [1, 2, i + 3], endless, 60))
            for i in range(scale.clients // 2)
        ]
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        outs = await asyncio.gather(*tasks)
    res.requests = len(outs)
    res.hung = sum(o.hung for o in outs)
    res.explicit_errors = sum(isinstance(o.error, RequestFailed) for o in outs)
    res.seconds_to_know = max((o.ended_at - t0 for o in outs), default=0.0)
    if res.explicit_errors != len(outs):
        res.notes = f"{len(outs) - res.explicit_errors} killed requests ended without an error"
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while node.supervisor.restarts == restarts and loop.time() < end:
        await asyncio.sleep(0.1)  # the bystanders go to the restarted engine
    await asyncio.sleep(0.5)
    res.bystanders, res.bystanders_correct, hung = await by.run(node.address)
    res.hung += hung
    await settle(node, res)
    return res


async def clients_vanish(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """Clients close their sockets mid-stream without a word."""
    res = ScenarioResult("clients_vanish")
    clients = [AsyncClient(node.address, timeout=60) for _ in range(scale.clients)]
    for c in clients:
        await c.start()
    streams = [c.stream([2, 3, i + 4], _long(scale)) for i, c in enumerate(clients)]
    await asyncio.gather(*(s.__anext__() for s in streams))
    bystanders = asyncio.ensure_future(by.run(node.address))
    for c in clients:  # vanish: no abort, the socket just closes
        c._closed = True
        # the monitor goes first, while its reader is open: a socket closed under a monitor
        # whose reader is gone blocks a ZeroMQ thread of the shared context sending it the
        # close event, and every later socket of the process stalls (as close() does)
        c._sock.disable_monitor()
        for task in (c._reader, c._monitor):
            task.cancel()
        c._sock.close(linger=0)
    res.requests = len(clients)
    res.bystanders, res.bystanders_correct, res.hung = await bystanders
    await settle(node, res)
    return res


async def abort_half(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """A client aborts half its requests; the other half must finish correctly."""
    res = ScenarioResult("abort_half")
    async with AsyncClient(node.address, timeout=60) as client:
        n = scale.clients

        async def one(i: int) -> Outcome:
            if i % 2:
                return await run_request(
                    client, BYSTANDER_PROMPTS[i % 4], by.sampling(), DEADLINE_S * 6
                )
            out = Outcome()
            async with contextlib.aclosing(client.stream([4, 5, i], _long(scale))) as s:
                async for delta in s:
                    out.tokens.extend(delta.token_ids)
                    if len(out.tokens) >= 2:
                        break
            return out

        outs = await asyncio.gather(*(one(i) for i in range(n)))
    res.requests = n
    res.hung = sum(o.hung for o in outs)
    kept = [(i, o) for i, o in enumerate(outs) if i % 2]
    res.bystanders = len(kept)
    res.bystanders_correct = sum(o.tokens == by.reference[i % 4] for i, o in kept)
    await settle(node, res)
    return res


async def overload(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """Ten times what the node admits and queues: each request finishes or is refused."""
    res = ScenarioResult("overload_10x")
    sc = node.cfg.scheduler
    n = 10 * (sc.max_num_active_requests + sc.max_queue_size)
    n = min(n, 40 * scale.clients)
    async with AsyncClient(node.address, timeout=120) as client:
        outs = await asyncio.gather(
            *(run_request(client, BYSTANDER_PROMPTS[i % 4], by.sampling(), 120) for i in range(n))
        )
    res.requests = n
    res.hung = sum(o.hung for o in outs)
    res.explicit_errors = sum(o.error is not None for o in outs)
    done = [(i, o) for i, o in enumerate(outs) if o.error is None and not o.hung]
    res.bystanders = len(done)
    res.bystanders_correct = sum(o.tokens == by.reference[i % 4] for i, o in done)
    res.notes = f"{len(done)} finished, {res.explicit_errors} refused"
    await settle(node, res)
    return res


class _Raw:
    def __init__(self, ctx: zmq.asyncio.Context, address: str, opts: dict | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for k, v in (opts or {}).items():
            self.sock.setsockopt(k, v)
        self.sock.connect(address)

    async def replies(self, timeout: float) -> list | None:
        try:
            frame = await asyncio.wait_for(self.sock.recv(), timeout)
        except TimeoutError:
            return None
        return msgspec.msgpack.decode(frame, type=list[ClientReply])


def _gen(rid: str, **sampling) -> dict:
    return {
        "type": "GenerateRequest",
        "request_id": rid,
        "prompt_token_ids": [1, 2, 3],
        "sampling": {"max_tokens": 4, **sampling},
    }


async def wire_fuzz(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """Random, truncated, wrong-schema and oversized frames, id collisions, foreign aborts."""
    res = ScenarioResult("wire_fuzz")
    rng = random.Random(0)
    ctx = zmq.asyncio.Context()
    enc = msgspec.msgpack.encode
    valid = enc(_gen("t"))
    frames: list[bytes] = []
    for i in range(scale.clients):
        frames.append(rng.randbytes(rng.randint(1, 200)))
        frames.append(valid[: rng.randint(1, len(valid) - 1)])
        frames.append(enc({"type": "GenerateRequest", "request_id": f"w{i}", "bogus": i}))
        frames.append(enc({"type": "Nope", "request_id": f"w{i}"}))
        frames.append(enc([1, 2, {"a": None}]))
        frames.append(enc(_gen(f"s{i}", top_k=2**63)))
    bystanders = asyncio.ensure_future(by.run(node.address))
    try:
        raw = _Raw(ctx, node.address)
        t0 = time.monotonic()
        answered, worst = 0, 0.0
        for frame in frames:
            await raw.sock.send(frame)
            got = await raw.replies(DEADLINE_S)
            if got is None:
                res.hung += 1
                continue
            answered += 1
            res.explicit_errors += sum(isinstance(r, RequestError) for r in got)
            worst = max(worst, time.monotonic() - t0)
            t0 = time.monotonic()
        # id collisions between two clients, and foreign aborts: both run to completion
        a, b = _Raw(ctx, node.address), _Raw(ctx, node.address)
        for k in range(4):
            await a.sock.send(enc(_gen(f"same{k}", max_tokens=20, ignore_eos=True)))
            await b.sock.send(enc(_gen(f"same{k}", max_tokens=20, ignore_eos=True)))
            await b.sock.send(enc({"type": "AbortRequest", "request_id": f"same{k}"}))
        for sock, aborted in ((a, False), (b, True)):
            finals = 0
            while finals < 4:
                got = await sock.replies(DEADLINE_S)
                if got is None:
                    res.hung += 4 - finals
                    break
                for r in got:
                    if isinstance(r, RequestError) or r.finish_reason is not None:
                        finals += 1
                        if not aborted and r.finish_reason != "length":
                            res.notes += f" foreign abort reached {r.request_id};"
        # an oversized frame: the sender is dropped, the node lives on
        big = _Raw(ctx, node.address)
        await big.sock.send(b"\0" * (node.cfg.frontend.max_message_bytes + 1))
        res.requests = len(frames) + 16 + 1
        res.seconds_to_know = worst
        for s in (raw, a, b, big):
            s.sock.close(linger=0)
    finally:
        ctx.term()
    res.bystanders, res.bystanders_correct, hung = await bystanders
    res.hung += hung
    await settle(node, res)
    return res


async def poison(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """Values the engine cannot represent, beside bystanders."""
    res = ScenarioResult("poison")
    bad = [
        SamplingParams(top_k=2**63),
        SamplingParams(temperature=float("inf")),
        SamplingParams(temperature=float("nan")),
        SamplingParams(seed=-1),
        SamplingParams(stop_token_ids=[2**62]),
        SamplingParams(logprobs=10**9),
        SamplingParams(max_tokens=2**63 - 1),
        SamplingParams(top_k=2**64 + 1),
    ]
    bystanders = asyncio.ensure_future(by.run(node.address))
    async with AsyncClient(node.address, timeout=60) as client:
        t0 = time.monotonic()
        outs = await asyncio.gather(
            *(run_request(client, [1, 2, 3], s, DEADLINE_S) for s in bad * 2)
        )
    res.requests = len(outs)
    res.hung = sum(o.hung for o in outs)
    res.explicit_errors = sum(o.error is not None for o in outs)
    res.seconds_to_know = max((o.ended_at - t0 for o in outs), default=0.0)
    b, c, h = await bystanders
    res.bystanders, res.bystanders_correct, res.hung = b, c, res.hung + h
    await settle(node, res)
    return res


async def id_reuse(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """An id reused at once after an abort and after an error must work every time."""
    res = ScenarioResult("id_reuse")
    async with AsyncClient(node.address, timeout=60) as client:
        for k in range(scale.clients // 2):
            rid = f"reuse{k % 2}"
            async with contextlib.aclosing(
                client.stream([1, 2, 3], _long(scale), request_id=rid)
            ) as s:
                async for _ in s:
                    break
            with contextlib.suppress(GreenroomError):
                await client.generate([1, 2], SamplingParams(top_p=5.0), request_id=rid)
                res.notes += "invalid request accepted;"
            res.explicit_errors += 1
            i = k % 4
            try:
                async with asyncio.timeout(DEADLINE_S * 3):
                    r = await client.generate(BYSTANDER_PROMPTS[i], by.sampling(), request_id=rid)
            except TimeoutError:
                res.hung += 1
                continue
            res.bystanders += 1
            res.bystanders_correct += r.token_ids == by.reference[i]
        res.requests = 3 * (scale.clients // 2)
    await settle(node, res)
    return res


async def slow_reader(node: Node, by: Bystanders, scale: Scale) -> ScenarioResult:
    """A client with tiny buffers that stops reading for 2 s: every final message arrives."""
    res = ScenarioResult("slow_reader")
    ctx = zmq.asyncio.Context()
    try:
        raw = _Raw(ctx, node.address, {zmq.RCVHWM: 2, zmq.RCVBUF: 4096})
        n = scale.clients // 2
        for i in range(n):
            sampling = {"max_tokens": scale.max_tokens * 4, "ignore_eos": True, "logprobs": 20}
            await raw.sock.send(msgspec.msgpack.encode({**_gen(f"r{i}"), "sampling": sampling}))
        bystanders = asyncio.ensure_future(by.run(node.address))
        await asyncio.sleep(2.0)
        finals, tokens = set(), 0
        t0 = time.monotonic()
        while len(finals) < n:
            got = await raw.replies(DEADLINE_S)
            if got is None:
                break
            for r in got:
                if isinstance(r, RequestError):
                    res.explicit_errors += 1
                    finals.add(r.request_id)
                else:
                    tokens += len(r.token_ids)
                    if r.finish_reason is not None:
                        finals.add(r.request_id)
        res.seconds_to_know = time.monotonic() - t0
        res.requests = n
        res.hung = n - len(finals)
        if tokens != n * scale.max_tokens * 4:
            res.notes = f"{tokens} of {n * scale.max_tokens * 4} tokens arrived;"
        if not node.frontend.stats["backpressure"]:
            res.notes += " the server never met a full socket"
        raw.sock.close(linger=0)
    finally:
        ctx.term()
    res.bystanders, res.bystanders_correct, hung = await bystanders
    res.hung += hung
    await settle(node, res)
    return res


async def server_kill(scale: Scale, reference: dict[int, list[int]]) -> ScenarioResult:
    """kill -9 of a `greenroom serve` process with clients streaming: all of them know."""
    res = ScenarioResult("server_kill_9")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "greenroom.cli",
            "serve",
            "--port",
            "0",
            "--num-blocks",
            "256",
            "--no-http",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = await asyncio.to_thread(_read_address, proc)
        # a fresh server process on a loaded machine: give its first handshake time
        clients = [
            AsyncClient(address, timeout=600, connect_timeout=120)
            for _ in range(scale.clients // 2)
        ]
        for c in clients:
            await c.start()
        tasks = [
            asyncio.ensure_future(run_request(c, [1, 2, 3], _long(scale), 600)) for c in clients
        ]
        await asyncio.sleep(0.5)
        proc.kill()
        t0 = time.monotonic()
        outs = await asyncio.gather(*tasks)
        res.requests = len(outs)
        res.hung = sum(o.hung for o in outs)
        res.explicit_errors = sum(isinstance(o.error, ServerUnavailable) for o in outs)
        res.seconds_to_know = max((o.ended_at - t0 for o in outs), default=0.0)
        res.server_alive = False
        res.notes = "the server is the fault: alive-after is false by design"
        for c in clients:
            await c.close()
    finally:
        proc.kill()
        proc.wait()
    return res


def _read_address(proc: subprocess.Popen) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"clients connect to (tcp://\S+)", line)
        if m:
            return m.group(1)
    raise RuntimeError("the server exited before it was ready")


SCENARIOS = [
    engine_kill,
    clients_vanish,
    abort_half,
    overload,
    wire_fuzz,
    poison,
    id_reuse,
    slow_reader,
]


async def run_suite(quick: bool, only: list[str] | None = None) -> list[ScenarioResult]:
    scale = Scale.of(quick)
    cfg = load_config(
        overrides={
            "port": 0,
            "engine_host": "process",
            "kv.num_blocks": 512,
            # exact greedy equality with the clean run: no prefix-cache recompute paths
            "kv.enable_prefix_reuse": False,
            "scheduler.max_num_tokens": 256,
            # room for every vanishing client's stream at once; overload sends 10x this
            "scheduler.max_num_active_requests": max(16, scale.clients),
            "scheduler.max_queue_size": max(16, scale.clients),
            "log_level": "error",
        }
    )
    results: list[ScenarioResult] = []
    with small_client_socket_buffers():
        node = await Node.start(cfg)
    try:
        reference = await reference_tokens(node.address, scale)
        by = Bystanders(reference, scale)
        for scenario in SCENARIOS:
            if only and scenario.__name__ not in only:
                continue
            results.append(await scenario(node, by, scale))
    finally:
        await node.stop()
    if not only or "server_kill" in only:
        results.append(await server_kill(scale, reference))
    return results


__all__ = ["SCENARIOS", "ScenarioResult", "run_suite"]
