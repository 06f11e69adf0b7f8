"""The scheduler's own CPU time per iteration: mixed chunked prefill against the two
SM-disaggregation flows under adaptive routing, on the real core and KV manager.

Every scheduler microsecond sits on the path of a new prompt's first token (the plan that
carries it is built, and its result applied, on the node's event loop, which shares the
interpreter with the engine threads), so adaptive routing should cost the scheduler no more
than mixed mode does. The driver does what the scheduler actor does per result: every flow
is asked ``has_work`` twice (before building, and again after its wake event is cleared),
and a flow with work builds a KVStep, has the KV manager answer it, finishes the plan and
applies a result that samples one token per step. A short prompt arrives every
``arrival_every`` iterations and each request decodes for ``running * arrival_every`` tokens,
so about ``running`` requests decode at any time (OpenOrca-like: every prompt is short and
rides in the generation step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from greenroom.actors.scheduling import FlowBudget, SchedulerCore
from greenroom.actors.scheduling.routing import PromptRouting
from greenroom.bus.messages import SampledToken, SamplingParams, StepResult, SubmitRequest
from greenroom.config import KVConfig, SchedulerConfig
from greenroom.kv import KVCacheManager

TOKENS_PER_BLOCK = 16
PROMPT_TOKENS = 200
ROUTING_THRESHOLD = 1024  # every prompt here is shorter: all ride, as on OpenOrca


@dataclass(frozen=True)
class IterationCost:
    mode: str  # "mixed" or "adaptive"
    running: int  # requests decoding at a time (about)
    iterations: int
    us_per_iteration: float
    us_per_iteration_p50: float


def _core(mode: str, running: int) -> SchedulerCore:
    cfg = SchedulerConfig(max_num_tokens=2048, max_batch_size=max(256, 2 * running))
    if mode == "mixed":
        flows, routing = [FlowBudget("mixed", 2048, cfg.max_batch_size)], None
    elif mode == "adaptive":
        flows = [
            FlowBudget("context", 4096, cfg.max_batch_size),
            FlowBudget("generation", 2048, cfg.max_batch_size),
        ]
        routing = PromptRouting("adaptive", ROUTING_THRESHOLD)
    else:
        raise ValueError(f"mode {mode!r} is invalid: mixed or adaptive")
    return SchedulerCore(cfg, TOKENS_PER_BLOCK, 1 << 20, [0], flows, routing=routing)


def _submit(core: SchedulerCore, n: int, max_tokens: int) -> None:
    prompt = [1 + (n * 31 + i * 7) % 1000 for i in range(PROMPT_TOKENS)]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    core.submit(SubmitRequest(request_id=f"r{n}", prompt_token_ids=prompt, sampling=sp))


def _iterate(core: SchedulerCore, kv: KVCacheManager, flow: str) -> None:
    if not core.has_work(flow):
        core.has_work(flow)  # the actor asks again after clearing its wake event
        return
    step = core.build_kv_step(flow)
    plan = core.apply_kv_result(flow, kv.step(step)) if step is not None else None
    if plan is None:
        return
    sampled = [SampledToken(s.request_id, 1) for s in plan.steps]
    core.apply_step_result(flow, StepResult(iteration=plan.iteration, sampled=sampled, flow=flow))


def iteration_cost(
    mode: str, running: int, iterations: int, arrival_every: int = 4
) -> IterationCost:
    """Scheduler time per generation-flow iteration at about ``running`` decoding requests."""
    if running < 1 or iterations < 1 or arrival_every < 1:
        raise ValueError("running, iterations and arrival_every must be >= 1")
    core = _core(mode, running)
    blocks = running * 4 * (PROMPT_TOKENS + running * arrival_every) // TOKENS_PER_BLOCK
    kv = KVCacheManager(
        KVConfig(tokens_per_block=TOKENS_PER_BLOCK, enable_prefix_reuse=False), blocks
    )
    flows = list(core.flows)
    lifetime = running * arrival_every
    n = 0
    for _ in range(running):  # start near the steady state: staggered remaining lengths
        n += 1
        _submit(core, n, 1 + (n * lifetime) // running)
    times = []
    for i in range(2 * lifetime + iterations):  # warm-up: two lifetimes, then timed
        t0 = time.perf_counter()
        if i % arrival_every == 0:
            n += 1
            _submit(core, n, lifetime)
        for flow in flows:
            _iterate(core, kv, flow)
        if i >= 2 * lifetime:
            times.append(time.perf_counter() - t0)
    times.sort()
    return IterationCost(
        mode,
        running,
        iterations,
        round(sum(times) / len(times) * 1e6, 1),
        round(times[len(times) // 2] * 1e6, 1),
    )


__all__ = ["IterationCost", "iteration_cost"]
