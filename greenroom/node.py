"""One greenroom node: frontend, scheduler, KV manager and engine actors, wired and supervised.

    node = await Node.start(cfg)       # returns once clients can connect at node.address
    ...
    await node.stop()                  # fails in-flight requests with an error, then shuts down

The engine is supervised (one_for_one): a crash fails the requests it was running, and a fresh
engine takes the next plans. Past the restart limit the node shuts down cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from greenroom.actors import ActorRef, Runtime, Supervisor
from greenroom.actors.engine import Engine
from greenroom.actors.frontend import Frontend, FrontendLimits
from greenroom.actors.kv_manager import KVManager
from greenroom.actors.scheduler import Drain, Scheduler, SchedulerStatsQuery
from greenroom.bus.messages import EngineInfo, EngineInfoQuery, KVStats, KVStatsQuery, ServerInfo
from greenroom.config import ConfigError, NodeConfig
from greenroom.heap import freeze_startup_heap, thaw_heap
from greenroom.logging import configure_logging, get_logger
from greenroom.node_security import client_socket_security
from greenroom.startup import StartupError, check_http_port, preflight

log = get_logger(__name__)

ENGINE_START_TIMEOUT_S = 600.0


def _load_tokenizer(model_path: str | None):
    if not model_path:
        return None
    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@dataclass
class Node:
    cfg: NodeConfig
    runtime: Runtime
    supervisor: Supervisor
    info: EngineInfo
    frontend: Frontend
    refs: dict[str, ActorRef] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    resources: list = field(default_factory=list)
    exit_code: int = 0  # 1 once the supervisor gave up (restart limit)
    failure: str | None = None  # why the node stopped itself (restart limit), if it did
    _stop_task: asyncio.Task | None = None
    _summary_task: asyncio.Task | None = None
    _frozen: bool = False  # start-up objects frozen (greenroom.heap) until the node stops

    @property
    def address(self) -> str:
        return self.frontend.bound_address

    @classmethod
    async def start(cls, cfg: NodeConfig) -> Node:
        if cfg.role == "router":
            raise ConfigError("role = 'router' is served by greenroom.router.RouterNode, not Node")
        if cfg.role in ("context", "generation"):
            from greenroom.kv.transfer import NixlUnavailable, load_nixl

            try:
                load_nixl()
            except NixlUnavailable as exc:
                raise ConfigError(f"role = {cfg.role!r}: {exc}") from None
        cfg = preflight(cfg)
        security = client_socket_security(cfg)
        rt = Runtime()
        holder: dict[str, Node] = {}

        def escalate(reason: BaseException) -> None:
            log.error("restart limit reached; shutting the node down", reason=str(reason))
            node = holder.get("node")
            if node is not None:
                node.exit_code = 1
                node.failure = str(reason)
                asyncio.get_running_loop().create_task(node.stop())

        sup = Supervisor(
            rt, max_restarts=cfg.engine_max_restarts, period_s=60.0, on_escalate=escalate
        )
        resources: list = []  # closed after the actors stop (the rank bus, the store)
        try:
            engines, cfg = await _start_engines(cfg, sup, resources)
            first = next(iter(engines.values()))
            info: EngineInfo = await first.ask(EngineInfoQuery(), timeout=ENGINE_START_TIMEOUT_S)
            info = fit_max_model_len(info)
            agent = info.kv_agent
            kv = await rt.spawn(
                KVManager,
                cfg.kv,
                info.num_blocks,
                None,
                cfg.kv_transfer,
                agent if cfg.role == "context" else None,
                cfg.parallel.tp_size,
                cfg.parallel.cp_size,
                name="kv-manager",
                host="loop",
            )
            server_info = ServerInfo(
                request_id="",
                model_name=info.model_name,
                max_model_len=info.max_model_len,
                vocab_size=info.vocab_size,
                num_blocks=info.num_blocks,
                tokens_per_block=info.tokens_per_block,
                device=info.device,
                has_tokenizer=False,
                role=cfg.role,
                tp_size=cfg.parallel.tp_size,
                kv_layout=agent.kv_layout if agent is not None else "",
                max_message_bytes=cfg.frontend.max_message_bytes,
            )
            tokenizer = _load_tokenizer(cfg.model.path)
            if tokenizer is not None:
                server_info = msgspec.structs.replace(server_info, has_tokenizer=True)
            frontend = Frontend(
                cfg.client_address,
                FrontendLimits(
                    max_model_len=info.max_model_len,
                    vocab_size=info.vocab_size,
                    max_request_id_len=cfg.frontend.max_request_id_len,
                ),
                server_info,
                tokenizer,
                max_message_bytes=cfg.frontend.max_message_bytes,
                heartbeat_s=cfg.frontend.heartbeat_s,
                security=security,
                insecure=cfg.security.insecure,
            )
            fe_ref = await rt.spawn(lambda: frontend, name="frontend", host="loop")
            sched = await rt.spawn(
                Scheduler, cfg, info, kv, engines, fe_ref, name="scheduler", host="loop"
            )
            frontend.attach(sched, kv)
        except BaseException:
            await rt.shutdown(timeout=10.0)
            _close_all(resources)
            raise
        node = cls(
            cfg,
            rt,
            sup,
            info,
            frontend,
            {"kv": kv, "scheduler": sched, "frontend": fe_ref, **engines},
        )
        node.resources = resources
        holder["node"] = node
        freeze_startup_heap()  # thawed in _shutdown
        node._frozen = True
        if cfg.log_stats_interval_s > 0:
            node._summary_task = asyncio.get_running_loop().create_task(
                node._log_summaries(cfg.log_stats_interval_s)
            )
        log.info(
            "node ready",
            address=node.address,
            model=info.model_name,
            device=info.device,
            num_blocks=info.num_blocks,
        )
        return node

    async def kv_stats(self) -> KVStats:
        """The KV manager's node-level counters (blocks, hit rate, host-tier traffic)."""
        return await self.refs["kv"].ask(KVStatsQuery(), timeout=30.0)

    async def scheduler_stats(self) -> dict:
        """The scheduler's counters (requests by state, plans, budget use)."""
        return await self.refs["scheduler"].ask(SchedulerStatsQuery(), timeout=30.0)

    async def _log_summaries(self, interval_s: float) -> None:
        """One info line every `interval_s` while the node is busy (and one when it goes idle)."""
        last_prompt = last_gen = 0
        was_busy = False
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            try:
                sched, kv = await self.scheduler_stats(), await self.kv_stats()
            except Exception as exc:
                log.warning("node summary unavailable", error=repr(exc))
                continue
            now = loop.time()
            prompt, gen = sched.get("prefill_tokens", 0), sched.get("output_tokens", 0)
            running, waiting = sched.get("active", 0), sched.get("waiting", 0)
            busy = bool(running or waiting or gen != last_gen or prompt != last_prompt)
            if busy or was_busy:
                dt = max(now - t0, 1e-9)
                used = kv.total_blocks - kv.free_blocks
                log.info(
                    "node summary",
                    prompt_tokens_per_s=round((prompt - last_prompt) / dt, 1),
                    generation_tokens_per_s=round((gen - last_gen) / dt, 1),
                    running=running,
                    waiting=waiting,
                    kv_use_pct=round(100.0 * used / max(kv.total_blocks, 1), 1),
                    prefix_hit_pct=round(100.0 * kv.hit_blocks / max(kv.lookups_blocks, 1), 1),
                )
            was_busy = busy
            last_prompt, last_gen, t0 = prompt, gen, now

    async def wait_blocks_free(self, timeout: float = 10.0) -> KVStats:
        """Wait until no request holds a KV block (all finished, aborted or failed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.kv_stats()
            if stats.free_blocks == stats.total_blocks:
                return stats
            if loop.time() > deadline:
                raise TimeoutError(f"KV blocks still held after {timeout} s: {stats}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 10.0) -> None:
        """Fail in-flight requests with a clear error, then stop every actor (idempotent)."""
        if self._stop_task is None:
            self.stopping.set()
            self._stop_task = asyncio.get_running_loop().create_task(self._shutdown(timeout))
        await asyncio.shield(self._stop_task)

    async def _shutdown(self, timeout: float) -> None:
        if self._summary_task is not None:
            self._summary_task.cancel()
        with contextlib.suppress(Exception):
            await self.refs["scheduler"].ask(Drain(), timeout=5.0)
            await asyncio.sleep(0.05)  # let the frontend flush the errors to clients
        _close_all(self.resources)  # other nodes' agents hear "shutdown" before the sockets close
        await self.runtime.shutdown(timeout=timeout)
        if self._frozen:
            self._frozen = False
            thaw_heap()
        _release_device_caches()


def fit_max_model_len(info: EngineInfo) -> EngineInfo:
    """Lower max_model_len to what the KV pool can hold for one request (with a warning), so
    that any request the frontend accepts can finish."""
    usable = (info.num_blocks - 1) * info.tokens_per_block  # block 0 is the reserved null block
    if usable >= info.max_model_len:
        return info
    if usable < 2:
        raise ConfigError(
            f"kv.num_blocks = {info.num_blocks} is invalid: the KV pool holds {max(usable, 0)} "
            "tokens, too few for any request (raise kv.num_blocks)"
        )
    log.warning(
        "max_model_len lowered to what the KV pool holds",
        max_model_len=info.max_model_len,
        pool_tokens=usable,
        num_blocks=info.num_blocks,
    )
    return msgspec.structs.replace(info, max_model_len=usable)


def _release_device_caches() -> None:
    """After the engines stopped: free the matmul library's per-stream workspaces, which the
    allocator keeps for every stream a node used (an SM-disaggregated node makes new partition
    streams each time, so they would pile up across nodes in one process)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _close_all(resources: list) -> None:
    for resource in reversed(resources):
        with contextlib.suppress(Exception):
            resource.close()


async def _start_engines(
    cfg: NodeConfig, sup: Supervisor, resources: list
) -> tuple[dict[str, ActorRef], NodeConfig]:
    """The engines by flow, and the config with what starting them decided (SM
    disaggregation: the measured ``sm_disagg.routing_threshold_tokens``)."""
    if cfg.parallel.world_size > 1:
        from greenroom.parallel.head import start_rank_group

        return await start_rank_group(cfg, sup, resources), cfg
    if not cfg.sm_disagg.enabled:
        import torch

        if cfg.resolved_engine_host(torch.cuda.is_available()) == "process":
            ref = await sup.start_child(
                "greenroom.actors.engine:Engine",
                msgspec.to_builtins(cfg),
                name="engine",
                host="process",
            )
        else:
            ref = await sup.start_child(Engine, cfg, name="engine", host="thread")
        return {"mixed": ref}, cfg
    from greenroom.actors.sm_engines import start_sm_engines

    engines, threshold = await start_sm_engines(cfg, sup)
    sm = msgspec.structs.replace(cfg.sm_disagg, routing_threshold_tokens=threshold)
    return engines, msgspec.structs.replace(cfg, sm_disagg=sm)


async def _start_http(cfg: NodeConfig, node: Node):
    from greenroom.http.launcher import HttpServer
    from greenroom.http.settings import HttpSettings

    h = cfg.http
    settings = HttpSettings(
        node_address=node.address,
        model_path=node.cfg.model.path,  # resolved by preflight (a hub id becomes a directory)
        served_model_name=h.served_model_name,
        chat_template=h.chat_template,
        health_timeout_s=h.health_timeout_s,
        request_timeout_s=cfg.scheduler.request_timeout_s,
    )
    server = HttpServer.start(settings, h.host, h.port, h.workers)
    try:
        await server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


async def _serve(cfg: NodeConfig) -> int:
    # context and generation nodes serve a router, not clients: no HTTP API there
    http_on = cfg.http.enabled and cfg.role == "mixed"
    if http_on and cfg.http.port:
        check_http_port(cfg.http.host, cfg.http.port)
    node = await Node.start(cfg)
    http = None
    if http_on:
        try:
            http = await _start_http(cfg, node)
        except (RuntimeError, TimeoutError) as exc:
            await node.stop()
            raise StartupError(f"the HTTP server did not start: {exc}") from None
    print(
        f"greenroom: serving {node.info.model_name} on {node.info.device}; clients connect to {node.address}",
        flush=True,
    )
    if http is not None:
        print(f"greenroom: OpenAI-compatible HTTP API at {http.url}/v1", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, lambda: loop.create_task(node.stop()))
    await node.stopping.wait()
    if http is not None:
        http.stop()
    await node.stop()
    if node.exit_code:
        why = f": {node.failure}" if node.failure else ""
        print(
            f"greenroom: stopped: the engine crashed past its restart limit{why}", file=sys.stderr
        )
        return node.exit_code
    print("greenroom: stopped", flush=True)
    return 0


def serve(cfg: NodeConfig) -> int:
    """Run one node until SIGINT/SIGTERM (in-flight requests end with an error). Startup
    problems raise :class:`greenroom.startup.StartupError` or ``ConfigError``."""
    configure_logging(cfg.log_format, cfg.log_level)
    main = _serve
    if cfg.role == "router":
        from greenroom.router import serve_router

        main = serve_router
    try:
        import uvloop

        return uvloop.run(main(cfg))
    except ImportError:
        return asyncio.run(main(cfg))
