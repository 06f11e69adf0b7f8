"""SM-level disaggregation: a context engine and a generation engine on one GPU.

Both engines live in this process and share one model runner — its weights and its KV pool —
each on its own thread with its own executor (sequence state), and on a GPU each on the stream
of a disjoint SM partition (green contexts). Sharing in-process needs no CUDA IPC: the two
threads launch onto their own streams and the runtime's only cross-stream ordering is the
handoff event. On a CPU the same two-engine protocol runs on two threads without streams.

The generation engine runs overlapped steps, as a mixed engine does (``model.overlap_steps``):
it launches each plan behind the one still on the GPU, on the stream its placement picks, and
reads that one's tokens after. The context engine runs plain steps: it records the handoff
event of a plan after the plan's result.
"""

from __future__ import annotations

from functools import partial

from greenroom.actors import ActorRef, Supervisor
from greenroom.actors.engine import Engine, HandoffEvents
from greenroom.actors.placement import ContextActivity, GenerationPlacement
from greenroom.actors.scheduling.routing import routing_threshold
from greenroom.config import NodeConfig, sm_disagg_budgets
from greenroom.logging import get_logger

log = get_logger(__name__)

# Decode graphs are captured with launch shapes (split-K attention, cuBLASLt's kernel choice)
# sized for the generation partition when it holds at least this share of the SMs. Measured on
# an H200 (scripts/bench_sm_streams.py, batch 16 / 64 at 2k context): on 108 of 132 SMs sizing
# cuts a decode step from 6.71 to 6.30 ms / 11.61 to 10.96 ms; on 68 SMs it slows it from 7.05
# to 8.31 ms / 11.79 to 12.78 ms (a memory-bound step on few SMs needs the extra CTAs in flight
# per SM that whole-device shapes give).
SIZE_FOR_PARTITION_MIN_SHARE = 0.75


def _partition_streams(cfg: NodeConfig, runner) -> tuple[object, object, int | None]:
    """(context stream, generation stream, SMs to size decode launches for, or None for the
    whole device's); all None on a CPU."""
    import torch

    from greenroom.kernels.sm_partition import choose_sm_split, create_sm_partitions

    if runner.device.type != "cuda":
        return None, None, None
    props = torch.cuda.get_device_properties(runner.device)
    ctx_sms, _ = choose_sm_split(props.multi_processor_count, cfg.sm_disagg.context_sm_percent)
    ctx_stream, gen_stream, info = create_sm_partitions(ctx_sms, device=runner.device.index or 0)
    log.info(
        "sm partitions",
        requested_percent=cfg.sm_disagg.context_sm_percent,
        total_sms=info.total_sms,
        context_engine_sms=info.context_sms,
        generation_engine_sms=info.generation_sms,
    )
    sized = info.generation_sms >= SIZE_FOR_PARTITION_MIN_SHARE * info.total_sms
    return ctx_stream, gen_stream, info.generation_sms if sized else None


def _capture_prefill_graphs(cfg: NodeConfig, runner, ctx_stream) -> None:
    """Prefill graphs on the context partition's stream, for the context flow's budgets: one
    replay per step instead of a few hundred eager launches (about 10 ms of host work)."""
    import time

    from greenroom.models.prefill_graphs import DEFAULT_MAX_REQUESTS

    tokens, batch = sm_disagg_budgets(cfg)
    max_requests = min(batch, DEFAULT_MAX_REQUESTS)
    t0 = time.perf_counter()
    sizes = runner.capture_prefill_graphs(
        stream=ctx_stream, max_num_tokens=tokens, max_requests=max_requests
    )
    log.info(
        "prefill graphs captured on the context stream",
        token_sizes=len(sizes),
        max_tokens=sizes[-1] if sizes else 0,
        max_requests=max_requests,
        capture_s=round(time.perf_counter() - t0, 1),
    )


def _routing_threshold_tokens(cfg: NodeConfig, runner, gen_stream) -> int:
    """``sm_disagg.routing_threshold_tokens``, measured when the config leaves it 0 under adaptive
    routing (0 stays 0 under fixed: no routing uses it).

    The knee that matters is that of the SMs the generation step runs on: up to it a chunk
    rides in a decode step almost free (the step reads every weight anyway); past it the step
    grows linearly with the chunk. So it is measured on every SM when the generation engine
    takes the whole GPU while the context engine is idle, else on the generation partition.
    The threshold is ``ride_knee_multiple`` knees: a context plan slows every decode step for
    its whole run on fewer SMs, so riding stays cheaper a while past the knee. (The context
    partition's knee, about a third of the whole GPU's, and the whole GPU's knee alone both
    sent a third of OpenOrca's prompts to the context engine and lost to mixed mode:
    BENCHMARKS.md, SM-level disaggregation, runs 4 and 5.)"""
    sd = cfg.sm_disagg
    if sd.routing_threshold_tokens > 0 or sd.policy != "adaptive":
        return sd.routing_threshold_tokens
    from greenroom.models.compute_bound import measure_compute_bound_tokens

    stream, where = gen_stream, "generation partition"
    if sd.whole_gpu_when_idle and runner.device.type == "cuda":
        import torch

        stream, where = torch.cuda.Stream(runner.device), "whole GPU"
    tokens, _ = sm_disagg_budgets(cfg)
    m = measure_compute_bound_tokens(runner, stream, max_tokens=tokens)
    threshold = routing_threshold(m.tokens, sd.ride_knee_multiple)
    log.info(
        "adaptive routing threshold measured where generation steps run",
        on=where,
        routing_threshold_tokens=threshold,
        knee_tokens=m.tokens,
        ride_knee_multiple=sd.ride_knee_multiple,
        prefill_tokens=m.sizes,
        prefill_ms=m.step_ms,
        measure_s=m.seconds,
    )
    return threshold


async def start_sm_engines(cfg: NodeConfig, sup: Supervisor) -> tuple[dict[str, ActorRef], int]:
    """The two engines, and the adaptive routing threshold (configured or measured)."""
    from greenroom.models.executor import PlanExecutor
    from greenroom.models.runner import ModelRunner

    runner = ModelRunner(cfg.model, cfg.kv, cfg.model.path)
    # Nano-batches stay off here: their side stream would run outside the generation
    # partition, and two engines would share it.
    runner.model.nano = None
    ctx_stream, gen_stream, gen_sms = _partition_streams(cfg, runner)
    # Decode and mixed-step graphs are captured once, here, on the generation partition's
    # stream (a graph keeps the SM partition it was captured on), and again on a whole-GPU
    # stream when the generation engine may take the whole GPU; a restarted generation engine
    # replays the same graphs. The context engine never touches them: it replays prefill graphs captured on its
    # own stream (batches past their sizes, and all of them with context_cuda_graphs off, run
    # eagerly there).
    # Launch shapes (split-K attention, matmul kernels) are fixed at capture.
    if gen_stream is not None:
        from greenroom.models.cuda_graphs import partition_sizing

        with partition_sizing(gen_sms):
            sizes = runner.capture_cuda_graphs(stream=gen_stream)
        log.info(
            "decode graphs captured on the generation stream",
            batch_sizes=len(sizes),
            launches_sized_for_sms=gen_sms or "device",
        )
        if cfg.sm_disagg.context_cuda_graphs:
            _capture_prefill_graphs(cfg, runner, ctx_stream)
    threshold = _routing_threshold_tokens(cfg, runner, gen_stream)
    handoffs, activity = HandoffEvents(), ContextActivity()
    placement = None
    if gen_stream is not None and cfg.sm_disagg.whole_gpu_when_idle:
        placement = GenerationPlacement(gen_stream, _whole_gpu_decode_graphs(runner), activity)

    def make_executor(role: str) -> PlanExecutor:
        graphs = "decode" if role == "generation" else "prefill"
        return PlanExecutor(runner, host_blocks=cfg.kv.host_blocks, graphs=graphs)

    refs = {}
    for role, stream in (("context", ctx_stream), ("generation", gen_stream)):
        refs[role] = await sup.start_child(
            Engine,
            cfg,
            role,
            partial(make_executor, role),
            stream,
            handoffs,
            activity if role == "context" else None,
            placement if role == "generation" else None,
            name=f"{role}-engine",
            host="thread",
        )
    return refs, threshold


def _whole_gpu_decode_graphs(runner):
    """A high-priority stream on every SM and the decode and mixed-step graphs captured on it
    (launches sized for the whole device), or None when the runner captures no graphs."""
    import torch

    stream = torch.cuda.Stream(runner.device, priority=-1)
    before = torch.cuda.memory_reserved(runner.device)
    sizes = runner.capture_cuda_graphs(stream=stream, whole_gpu=True)
    mixed = runner.whole_mixed_graphs
    log.info(
        "whole-GPU decode graphs captured",
        batch_sizes=len(sizes),
        mixed_token_sizes=mixed.token_sizes if mixed is not None else [],
        reserved_gib=round((torch.cuda.memory_reserved(runner.device) - before) / 2**30, 2),
    )
    return stream if sizes else None
