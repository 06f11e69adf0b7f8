"""A rank worker process: one GPU (or, on the CPU, one process) of a node's rank group.

Started by the node agent of its node (the head for node 0) as
``python -m greenroom.parallel.worker``, with a msgpack ``WorkerSpec`` on stdin; stdin stays
open as the lifeline (EOF: the agent is gone, so the worker exits at once, even from inside a
collective). The worker connects a DEALER to the head's rank bus, joins the epoch's
torch.distributed world, loads its weight slices and KV pool, reports ready, then runs every
plan the head sends, in order. Rank 0 of the TP group answers each plan with the step
result; every rank samples the same tokens from the same all-gathered logits, so each keeps
its own copy of the sequences' tokens without another message.

With pipeline stages, every stage gets every plan; activations go stage to stage through
torch.distributed (greenroom.parallel.pipe), and TP rank 0 of the last stage answers. With
``parallel.stage_reports``, TP rank 0 of every stage also reports when it ran each plan.

Exit codes: 0 stopped, 3 failed to start, 4 a plan out of sequence, 5 ranks diverged,
1 anything else (a collective timed out, a peer died).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import msgspec

EXIT_START_FAILED = 3
EXIT_OUT_OF_SEQUENCE = 4
EXIT_DIVERGED = 5


class WorkerSpec(msgspec.Struct, kw_only=True):
    rank: int = -1
    epoch: int
    pp_size: int
    cp_size: int
    tp_size: int
    nnodes: int
    bus_address: str
    store_addr: str
    store_port: int
    config: dict  # NodeConfig as builtins
    timeout_s: float
    sys_path: list[str] = []
    # CURVE towards the rank bus: (the head's public key, this node's public, secret key);
    # each node sets its own before starting its workers, so no secret leaves its node
    bus_keys: tuple[bytes, bytes, bytes] | None = None


def _lifeline() -> None:
    """Exit as soon as stdin reaches EOF (the agent closed it or died)."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def _read_spec() -> WorkerSpec:
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(8), "little")
    return msgspec.msgpack.decode(stdin.read(size), type=WorkerSpec)


def main() -> None:
    spec = _read_spec()
    for path in reversed(spec.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    threading.Thread(target=_lifeline, name="lifeline", daemon=True).start()
    code = run(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: the lifeline thread holds stdin's lock


def run(spec: WorkerSpec) -> int:
    import zmq

    from greenroom.bus.codec import decode, encode
    from greenroom.bus.messages import EngineInfo
    from greenroom.config import build_config
    from greenroom.logging import configure_logging, get_logger
    from greenroom.models.executor import PlanError
    from greenroom.parallel import messages as m
    from greenroom.parallel.groups import init_rank_groups
    from greenroom.parallel.layout import RankLayout
    from greenroom.parallel.pipe import StageMismatch

    cfg = build_config(spec.config)
    configure_logging(cfg.log_format, cfg.log_level, stream=sys.stderr)
    log = get_logger("greenroom.parallel.worker").bind(rank=spec.rank, epoch=spec.epoch)
    layout = RankLayout(spec.pp_size, spec.cp_size, spec.tp_size, spec.nnodes)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, f"rank-{spec.rank}".encode())
    if spec.bus_keys is not None:
        from greenroom.bus.security import apply_client_keys

        apply_client_keys(sock, *spec.bus_keys)
    sock.connect(spec.bus_address)

    def send(msg) -> None:
        sock.send_multipart(encode(msg), copy=False)

    send(m.RankHello(epoch=spec.epoch, rank=spec.rank, pid=os.getpid(), host=socket.gethostname()))
    try:
        device = _device(cfg, layout, layout.local_rank(spec.rank))
        groups = init_rank_groups(
            layout, spec.rank, spec.store_addr, spec.store_port, spec.epoch, device, spec.timeout_s
        )
        executor = _executor(cfg, device, groups, spec.timeout_s)
        receives = _receives(cfg, executor.runner, groups)
    except Exception as exc:
        log.exception("rank failed to start")
        send(m.RankFailed(epoch=spec.epoch, rank=spec.rank, error=f"{type(exc).__name__}: {exc}"))
        return EXIT_START_FAILED
    r = executor.runner
    info = EngineInfo(
        num_blocks=r.total_blocks,
        tokens_per_block=r.tokens_per_block,
        max_model_len=r.max_model_len,
        vocab_size=r.vocab_size,
        eos_token_ids=list(r.eos_token_ids),
        device=str(r.device)
        + (f" x tp{layout.tp_size}" if layout.tp_size > 1 else "")
        + (f" x pp{layout.pp_size}" if layout.pp_size > 1 else "")
        + (f" x cp{layout.cp_size}" if layout.cp_size > 1 else ""),
        model_name=r.model_name,
        kv_agent=receives.agent.info() if receives is not None else None,
    )
    send(m.RankReady(epoch=spec.epoch, rank=spec.rank, info=info))
    log.info("rank ready", device=str(device), num_blocks=r.num_blocks)
    coords = groups.coords
    reports = cfg.parallel.stage_reports and coords.tp == 0
    answers = coords.tp == 0 and coords.cp == 0 and coords.pp == layout.pp_size - 1
    held: list | None = None  # results held back by a HoldResults fault hook
    tp = groups.model
    expected = 1
    while True:
        msg = decode(sock.recv_multipart(copy=False))
        if isinstance(msg, m.Shutdown):
            if receives is not None:
                receives.close()
            groups.destroy()
            return 0
        if isinstance(msg, m.HoldResults):
            if msg.hold and held is None:
                held = []
            elif not msg.hold and held is not None:
                for out in held:
                    send(out)
                held = None
            continue
        if not isinstance(msg, m.RankPlan):
            continue
        if msg.epoch != spec.epoch or msg.plan_id != expected:
            log.error(
                "plan out of sequence; this rank stops",
                got=(msg.epoch, msg.plan_id),
                expected=(spec.epoch, expected),
            )
            return EXIT_OUT_OF_SEQUENCE
        expected += 1
        check = _start_plan_check(tp, msg.plan_id, device)
        result, error = None, None
        started = time.monotonic()
        if receives is not None:
            receives.start(msg.plan)
        try:
            result = executor.execute(msg.plan)
        except PlanError as exc:  # the same on every rank: raised before any collective
            error = str(exc)
        except StageMismatch:
            log.exception("stages ran different micro-batches; the group stops")
            return EXIT_DIVERGED
        if reports:
            send(
                m.StageRan(
                    epoch=spec.epoch,
                    stage=coords.pp,
                    plan_id=msg.plan_id,
                    start=started,
                    end=time.monotonic(),
                )
            )
        if check is not None:
            gathered, work = check
            work.wait()
            ids = gathered.tolist()
            if any(i != msg.plan_id for i in ids):
                log.error("ranks ran different plans; the group stops", plan_ids=ids)
                return EXIT_DIVERGED
        if receives is not None:
            receives.settle(idle=not msg.plan.steps)
            result = receives.report(result)
        if answers:
            out = m.RankResult(epoch=spec.epoch, plan_id=msg.plan_id, result=result, error=error)
            if held is None:
                send(out)
            else:
                held.append(out)


def _device(cfg, layout, local_rank: int):
    import torch

    from greenroom.models.cpu_threads import available_cores
    from greenroom.models.runner import resolve_device

    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # the node's cores but the head's one, shared by its CPU ranks
        requested = cfg.model.cpu_threads
        threads = requested or (available_cores() - 1) // layout.ranks_per_node
        torch.set_num_threads(max(1, threads))
    return device


def _executor(cfg, device, groups, timeout_s: float):
    from greenroom.models.executor import PlanExecutor
    from greenroom.models.runner import ModelRunner
    from greenroom.parallel.pipe import StageLink

    layout = groups.layout
    pp = (groups.coords.pp, layout.pp_size, tuple(cfg.parallel.pp_layers))
    runner = ModelRunner(
        cfg.model,
        cfg.kv,
        cfg.model.path,
        device,
        tp=groups.model,
        pp=pp,
        helix=groups.cp if layout.cp_size > 1 else False,
    )
    link = None
    if layout.pp_size > 1:
        link = StageLink(
            layout, groups.rank, runner.arch.hidden_size, runner.dtype, device, timeout_s
        )
    return PlanExecutor(runner, host_blocks=cfg.kv.host_blocks, link=link)


def _receives(cfg, runner, groups):
    """A Helix generation node's rank reads its share of each received request's KV."""
    if cfg.role != "generation":
        return None
    from greenroom.parallel.rank_receives import RankReceives

    return RankReceives.open(runner, groups.model, cfg)


def _start_plan_check(tp, plan_id: int, device):
    """Launch the gather of every TP rank's plan id; waited on after the step (the step's
    own read-back of the sampled tokens already synchronises, so this adds no stall)."""
    if tp.size == 1:
        return None
    import torch

    from greenroom.parallel.comm import gather_into

    local = torch.tensor([plan_id], dtype=torch.int64, device=device)
    gathered = torch.empty(tp.size, dtype=torch.int64, device=device)
    work = gather_into(gathered, local, tp.group, async_op=True)
    return gathered, work


if __name__ == "__main__":
    main()
