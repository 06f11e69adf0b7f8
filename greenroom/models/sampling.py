"""Batched sampling: greedy, temperature, top-k, top-p, seeds and top-n log-probs.

Penalties, logit bias and min_tokens (``greenroom.models.logits_adjust``) change the logits
first, only when a row of the batch asks for one; log-probs are those of the model's logits.

Random draws come from a counter-based hash of (seed, output index, vocabulary id), not from
a generator's state, so a seeded token is a pure function of (seed, index of the output
token, logits): a request recomputed after preemption, or moved from a context engine to a
generation engine, samples the same tokens. Sampling is Gumbel-max over the filtered,
temperature-scaled logits. Everything runs as whole-batch tensor ops on the logits' device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from greenroom.bus.messages import SamplingParams
from greenroom.models.host_copy import to_device
from greenroom.models.logits_adjust import LogitsAdjustments

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer bijection with good avalanche (the "lowbias32" finaliser)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` float32 uniforms in (0, 1), a pure function of (seed, step, vocab id)."""
    seeds = seeds.long()
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _mix32(lo ^ _mix32(hi ^ _mix32((steps.long() & _MASK32) ^ 0x9E3779B9)))
    col = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ 0x85EBCA6B)
    bits = _mix32(row.unsqueeze(1) ^ col.unsqueeze(0)) >> 8  # 24 bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def request_seed(request_id: str, engine_seed: int) -> int:
    """A stable seed for a request without one (same on every engine of a deployment)."""
    digest = hashlib.blake2b(f"{engine_seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_plain_greedy(params: SamplingParams) -> bool:
    """The token is the logits' argmax and nothing else is asked of the sampler: such a
    batch can take the argmax captured with a decode graph (no sampling launch at all)."""
    return params.temperature <= 0 and params.logprobs <= 0


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; <= 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the output token being sampled
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    max_logprobs: int
    adjustments: LogitsAdjustments | None = None  # None: no row has penalties, bias, min_tokens

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        device: torch.device | str,
        adjustments: LogitsAdjustments | None = None,
    ) -> SamplingBatch:
        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        return cls(
            temperature=put([p.temperature for p in params], torch.float32),
            top_k=put([p.top_k for p in params], torch.int64),
            top_p=put([p.top_p for p in params], torch.float32),
            seeds=put([s & ((1 << 63) - 1) for s in seeds], torch.int64),
            steps=put(steps, torch.int64),
            all_greedy=all(p.temperature <= 0 for p in params),
            use_top_k=any(p.top_k > 0 and p.temperature > 0 for p in params),
            use_top_p=any(p.top_p < 1.0 and p.temperature > 0 for p in params),
            max_logprobs=max((p.logprobs for p in params), default=0),
            adjustments=adjustments,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    token_logprobs: torch.Tensor | None = None  # [B] float32
    top_ids: torch.Tensor | None = None  # [B, max_logprobs] int64
    top_logprobs: torch.Tensor | None = None  # [B, max_logprobs] float32


def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (top-k applies first)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.use_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, vocab).unsqueeze(1)
        drop |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= k
    if batch.use_top_p:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
        drop |= before > batch.top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token per row of float32 ``logits [B, V]``."""
    logits = raw = logits.float()
    if batch.adjustments is not None:
        logits = batch.adjustments.apply(logits)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        tokens = greedy
    else:
        temp = torch.where(batch.temperature > 0, batch.temperature, 1.0).unsqueeze(1)
        scaled = logits / temp
        if batch.use_top_k or batch.use_top_p:
            scaled = _filter(scaled, batch)
        gumbel = -torch.log(-torch.log(uniform_noise(batch.seeds, batch.steps, logits.shape[1])))
        sampled = (scaled + gumbel).argmax(dim=-1)
        tokens = torch.where(batch.temperature > 0, sampled, greedy)
    out = SamplerOutput(token_ids=tokens)
    if batch.max_logprobs > 0:
        logprobs = raw.log_softmax(dim=-1)
        out.token_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        out.top_logprobs, out.top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
    return out
