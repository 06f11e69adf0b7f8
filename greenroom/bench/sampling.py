"""Sampler cost of the sampling options: one decode step's sampling for a batch where every
row uses penalties, logit bias and min_tokens, against the same batch with none of them.

A step is what the engine does per decode: build the batch's sampling tensors (and the
adjustments), sample, count the sampled tokens in the penalty history, read the tokens back.
"""

from __future__ import annotations

import torch

from greenroom.bench.timing import median_seconds
from greenroom.bus.messages import SamplingParams
from greenroom.models.logits_adjust import LogitsAdjustments
from greenroom.models.sampling import SamplingBatch, sample
from greenroom.models.token_history import TokenHistory


def _step_fn(params, logits, history, slots, device):
    seeds = list(range(len(params)))
    steps = [4] * len(params)

    def step() -> list[int]:
        adj = LogitsAdjustments.build(params, steps, slots, [2], history, device)
        batch = SamplingBatch.build(params, seeds, steps, device, adj)
        out = sample(logits, batch)
        if adj is not None:
            adj.record(out.token_ids)
        return out.token_ids.tolist()

    return step


def run(batch: int, vocab: int, prompt_len: int, device: str, reps: int, warmup: int) -> dict:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g).to(dev)
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()
    bias = {t: 1.0 for t in range(16)}
    result = {"batch": batch, "vocab": vocab, "prompt_len": prompt_len, "device": str(dev)}
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        plain = [SamplingParams(temperature=temperature, top_p=0.95)] * batch
        options = [
            SamplingParams(
                temperature=temperature,
                top_p=0.95,
                repetition_penalty=1.1,
                presence_penalty=0.5,
                frequency_penalty=0.5,
                logit_bias=bias,
                min_tokens=8,
            )
        ] * batch
        history = TokenHistory(vocab, dev)
        slots = [history.add(p, []) for p in prompts]
        base = median_seconds(_step_fn(plain, logits, None, [-1] * batch, dev), dev, reps, warmup)
        opts = median_seconds(_step_fn(options, logits, history, slots, dev), dev, reps, warmup)
        result[f"{name}_plain_ms"] = round(base * 1e3, 3)
        result[f"{name}_options_ms"] = round(opts * 1e3, 3)
        result[f"{name}_options_over_plain"] = round(opts / base, 3)
    result["history_bytes_per_request"] = vocab * 5  # bool prompt mask + float32 counts
    return result
