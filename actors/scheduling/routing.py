"""Adaptive routing of prompts under SM disaggregation: which go to the context engine and
which ride in the generation engine's step, as in mixed mode (pure; no I/O).

A prompt whose prefill is memory-bound on the context partition pays a whole weight read
there, while inside a generation step it rides on the decode step's weight read almost free
(measured on an H200 with Llama-2-70B shapes: 1-2 short prompts per context step of 83-157 ms
on 40 SMs, against 28-55 ms for a mixed step carrying them). So under ``adaptive`` a prompt
shorter than the routing threshold (``routing_threshold``: a few times the chunk size from
which a whole-GPU step is compute-bound) goes to the generation flow while its step has token
room, and every other prompt goes to the context flow, which takes as many waiting prompts as
its budget holds. ``fixed`` sends every prompt to the context flow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

RoutingPolicy = Literal["adaptive", "fixed"]


def compute_bound_tokens(
    weight_bytes: float,
    flops_per_token: float,
    partition_flops_per_s: float,
    bytes_per_s: float,
) -> int:
    """The chunk size from which a prefill on the context partition is compute-bound: its
    matmul time at the partition's measured rate reaches the time to read the weights once."""
    if min(weight_bytes, flops_per_token, partition_flops_per_s, bytes_per_s) <= 0:
        raise ValueError("weights, FLOPs per token and both rates must be positive")
    return max(1, round(weight_bytes * partition_flops_per_s / (bytes_per_s * flops_per_token)))


def routing_threshold(knee_tokens: int, ride_knee_multiple: float) -> int:
    """The adaptive routing threshold from a measured knee: ``ride_knee_multiple`` knees.

    Up to the knee a chunk in a generation step rides on the weight read the decode step makes
    anyway; past it the step grows by the chunk's matmul time. Sending the prompt to the
    context engine instead slows every decode step by the partition's share for the prefill's
    whole run there, which is several times longer on a fraction of the SMs; so riding stays
    the cheaper way for decoders (and the faster one for the prompt's first token) a few knees
    past the knee."""
    if knee_tokens < 1 or ride_knee_multiple < 1.0:
        raise ValueError(
            f"knee {knee_tokens} and multiple {ride_knee_multiple} are invalid: "
            "a positive knee and a multiple of at least 1"
        )
    return max(1, round(knee_tokens * ride_knee_multiple))


@dataclass(frozen=True, slots=True)
class PromptRouting:
    """How the scheduler splits prompts between the two SM-disaggregation flows:
    ``threshold_tokens`` is the routing threshold (``sm_disagg.routing_threshold_tokens``)."""

    policy: RoutingPolicy
    threshold_tokens: int
    # a prompt of any length rides when the generation flow carries nothing else
    # (``sm_disagg.ride_when_generation_idle``)
    ride_when_idle: bool = False

    def __post_init__(self) -> None:
        if self.policy not in ("adaptive", "fixed"):
            raise ValueError(f"routing policy {self.policy!r} is invalid: adaptive or fixed")
        if self.threshold_tokens < 1:
            raise ValueError(f"threshold_tokens = {self.threshold_tokens} is invalid: must be >= 1")

    @property
    def adaptive(self) -> bool:
        return self.policy == "adaptive"


@dataclass(frozen=True, slots=True)
class Waiting:
    """A prompt ready to be prefilled: its id and the tokens still to compute."""

    request_id: str
    tokens: int


@dataclass(frozen=True, slots=True)
class FlowRoom:
    """What one plan of a flow can still take: prompt tokens and sequences; ``running``: the
    requests (decodes, continuing chunks) its next plan carries already."""

    tokens: int
    seqs: int
    running: int = 0


@dataclass(slots=True)
class Routing:
    context: list[str] = field(default_factory=list)
    generation: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # no room this iteration


def route_prompts(
    policy: RoutingPolicy,
    prompts: Sequence[Waiting],
    threshold_tokens: int,
    context: FlowRoom,
    generation: FlowRoom,
    ride_when_idle: bool = False,
) -> Routing:
    """Route waiting prompts (FCFS) for one iteration of each flow.

    ``threshold_tokens``: prompts with fewer tokens to compute ride in the generation step
    (see ``routing_threshold``). A short prompt that does not fit the generation step's room
    goes to the context flow if that has room rather than wait; a prompt waits only when
    neither flow can take it whole. ``ride_when_idle``: while the generation flow carries no
    request, the first prompt that fits its room rides whatever its length: its step delays no
    decode, and runs on more SMs than the context engine's (every SM while that is idle) or
    beside it rather than queued behind it. Each flow keeps the prompts' arrival order.
    """
    if policy not in ("adaptive", "fixed"):
        raise ValueError(f"routing policy {policy!r} is invalid: adaptive or fixed")
    out = Routing()
    ctx_tokens, ctx_seqs = context.tokens, context.seqs
    gen_tokens, gen_seqs = generation.tokens, generation.seqs
    gen_idle = policy == "adaptive" and ride_when_idle and generation.running == 0
    for p in prompts:
        short = policy == "adaptive" and p.tokens < threshold_tokens
        if (short or gen_idle) and p.tokens <= gen_tokens and gen_seqs > 0:
            out.generation.append(p.request_id)
            gen_tokens -= p.tokens
            gen_seqs -= 1
            gen_idle = False  # the step carries this prompt now
        elif ctx_seqs > 0 and (p.tokens <= ctx_tokens or ctx_tokens == context.tokens):
            # a prompt longer than the whole budget still starts alone (it is chunked)
            out.context.append(p.request_id)
            ctx_tokens -= p.tokens
            ctx_seqs -= 1
        else:
            out.waiting.append(p.request_id)
    return out


__all__ = [
    "FlowRoom",
    "PromptRouting",
    "Routing",
    "RoutingPolicy",
    "Waiting",
    "compute_bound_tokens",
    "route_prompts",
    "routing_threshold",
]
