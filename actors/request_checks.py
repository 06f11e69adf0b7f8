"""Request validation: everything a request carries, checked against what the engine can represent.

One place, one function per field. Every field of `SamplingParams` first passes a generic check
by its value's type (integers within int64, floats finite, lists element by element), so a field
added to `SamplingParams` without a check of its own still cannot overflow a tensor; a field that
has a range adds a function to `SAMPLING_CHECKS`. A check returns the reason a value is invalid,
or None.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from greenroom.bus.messages import (
    SAMPLE_SEPARATOR,
    DecodeRequest,
    GenerateRequest,
    SamplingParams,
    ServerInfo,
    TransferHandle,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class FrontendLimits:
    max_model_len: int
    vocab_size: int
    max_request_id_len: int = 256


FieldCheck = Callable[[Any, FrontendLimits], str | None]


def representable(value: Any) -> str | None:
    """Why ``value`` cannot become an engine tensor element (int64 / float32), or None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return "is outside the 64-bit integer range"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "is not a finite number"
    if isinstance(value, (list, tuple)):
        for item in value:
            if (why := representable(item)) is not None:
                return f"holds {_short(item)}, which {why}"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if (why := representable(k) or representable(v)) is not None:
                return f"holds {_short(k)}: {_short(v)}, which {why}"
        return None
    return None


def _max_tokens(v: int, lim: FrontendLimits) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _temperature(v: float, lim: FrontendLimits) -> str | None:
    return None if v >= 0.0 else "must be >= 0"


def _top_k(v: int, lim: FrontendLimits) -> str | None:
    return None if v == -1 or v >= 1 else "must be -1 (disabled) or >= 1"


def _top_p(v: float, lim: FrontendLimits) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _seed(v: int | None, lim: FrontendLimits) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def _stop_token_ids(v: list[int], lim: FrontendLimits) -> str | None:
    bad = next((t for t in v if not 0 <= t < lim.vocab_size), None)
    if bad is None:
        return None
    return f"holds {bad}, outside the vocabulary [0, {lim.vocab_size})"


def _logprobs(v: int, lim: FrontendLimits) -> str | None:
    top = min(MAX_LOGPROBS, lim.vocab_size)
    return None if 0 <= v <= top else f"must be in [0, {top}]"


SAMPLING_CHECKS: dict[str, FieldCheck] = {
    "max_tokens": _max_tokens,
    "temperature": _temperature,
    "top_k": _top_k,
    "top_p": _top_p,
    "seed": _seed,
    "stop_token_ids": _stop_token_ids,
    "logprobs": _logprobs,
}


def check_sampling(s: SamplingParams, limits: FrontendLimits) -> str | None:
    """The first invalid field of ``s`` as a one-line reason, or None."""
    for f in msgspec.structs.fields(SamplingParams):
        value = getattr(s, f.name)
        why = representable(value)
        if why is None and (check := SAMPLING_CHECKS.get(f.name)) is not None:
            why = check(value, limits)
        if why is not None:
            return f"{f.name} = {_short(value)} is invalid: {why}"
    return None


def normalize_sampling(s: SamplingParams, limits: FrontendLimits) -> SamplingParams:
    """Values past what the engine uses, brought within it (top_k above the vocabulary)."""
    if s.top_k > limits.vocab_size:
        return msgspec.structs.replace(s, top_k=limits.vocab_size)
    return s


def check_request(req: GenerateRequest, limits: FrontendLimits) -> str | None:
    """Checks that need no prompt tokens (cheap; run before a text prompt is tokenized)."""
    if not req.request_id:
        return "request_id must be a non-empty string"
    if len(req.request_id) > limits.max_request_id_len:
        return (
            f"request_id has {len(req.request_id)} characters; at most "
            f"{limits.max_request_id_len} are allowed"
        )
    if not 0 <= req.priority <= 100:
        return f"priority = {_short(req.priority)} is invalid: must be in [0, 100]"
    if req.cache_salt is not None and len(req.cache_salt) > 1024:
        return "cache_salt is longer than 1024 characters"
    if req.prompt_token_ids is not None and len(req.prompt_token_ids) >= limits.max_model_len:
        return _too_long(len(req.prompt_token_ids), limits)
    return check_sampling(req.sampling, limits)


def check_prompt(prompt_ids: list[int], s: SamplingParams, limits: FrontendLimits) -> str | None:
    """Checks of the prompt's token ids and of its length with the output."""
    if not prompt_ids:
        return "the prompt is empty"
    n = len(prompt_ids)
    if n >= limits.max_model_len:
        return _too_long(n, limits)
    bad = next((t for t in prompt_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        return f"prompt token id {_short(bad)} is outside the vocabulary [0, {limits.vocab_size})"
    if n + s.max_tokens > limits.max_model_len:
        return (
            f"prompt ({n} tokens) + max_tokens ({s.max_tokens}) = {n + s.max_tokens} tokens "
            f"exceeds max_model_len ({limits.max_model_len})"
        )
    return None


def validate(req: GenerateRequest, limits: FrontendLimits, prompt_ids: list[int]) -> str | None:
    """The reason a request is invalid, or None: every field against what the engine can
    represent, then the sampling options' own ranges."""
    reason = check_request(req, limits) or check_prompt(prompt_ids, req.sampling, limits)
    if reason is not None:
        return reason
    if SAMPLE_SEPARATOR in req.request_id:
        return "request_id must not contain the character U+001F"
    return validate_sampling_options(req.sampling, limits)


MAX_SAMPLES = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 1024
MAX_REPETITION_PENALTY = 10.0


def validate_sampling_options(s: SamplingParams, limits: FrontendLimits) -> str | None:
    """The reason the stop / min_tokens / penalty / logit_bias / n fields are invalid, or None."""
    if not 1 <= s.n <= MAX_SAMPLES:
        return f"n = {s.n} is invalid: must be in [1, {MAX_SAMPLES}]"
    if not 0 <= s.min_tokens <= s.max_tokens:
        return (
            f"min_tokens = {s.min_tokens} is invalid: must be in [0, max_tokens = {s.max_tokens}]"
        )
    if not (
        math.isfinite(s.repetition_penalty) and 0.0 < s.repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        return (
            f"repetition_penalty = {s.repetition_penalty} is invalid: "
            f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off)"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            return f"{name} = {value} is invalid: must be in [-2, 2]"
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        return f"logit_bias has {len(s.logit_bias)} entries: at most {MAX_LOGIT_BIAS}"
    for token, bias in s.logit_bias.items():
        if not 0 <= token < limits.vocab_size:
            return f"logit_bias token id {token} is outside the vocabulary [0, {limits.vocab_size})"
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            return f"logit_bias[{token}] = {bias} is invalid: must be in [-100, 100]"
    if len(s.stop) > MAX_STOP_STRINGS:
        return f"stop has {len(s.stop)} strings: at most {MAX_STOP_STRINGS}"
    for text in s.stop:
        if not 0 < len(text) <= MAX_STOP_CHARS:
            return (
                f"stop string {text[:40]!r} is invalid: must have 1 to {MAX_STOP_CHARS} characters"
            )
    return None


def validate_handle(
    h: TransferHandle, req: DecodeRequest, prompt_ids: list[int], info: ServerInfo
) -> str | None:
    """The reason a generation node refuses a transfer handle, or None."""
    if h.request_id != req.request_id:
        return f"the transfer handle is for request {h.request_id!r}, not {req.request_id!r}"
    if h.tp_size != info.tp_size:
        return (
            f"tp_size mismatch: the context node runs tp_size = {h.tp_size}, this generation "
            f"node tp_size = {info.tp_size}; pair nodes of equal tp_size"
        )
    if h.kv_layout != info.kv_layout or h.tokens_per_block != info.tokens_per_block:
        return (
            f"the context node's KV layout ({h.kv_layout}) differs from this node's "
            f"({info.kv_layout}): serve the same model and kv.tokens_per_block on both"
        )
    if h.num_tokens != len(prompt_ids):
        return f"the handle holds {h.num_tokens} tokens, the prompt has {len(prompt_ids)}"
    need = -(-h.num_tokens // h.tokens_per_block)
    if len(h.block_ids) != need:
        return f"the handle names {len(h.block_ids)} blocks; {h.num_tokens} tokens need {need}"
    if any(not 0 < b < h.pool_blocks for b in h.block_ids):
        return f"the handle names blocks outside the context pool [1, {h.pool_blocks})"
    if not 0 <= h.first_token < info.vocab_size:
        return f"first token {h.first_token} is outside the vocabulary [0, {info.vocab_size})"
    if req.sampling.max_tokens < 2:
        return "max_tokens < 2: the context node's first token was the whole output"
    if h.lease_deadline <= time.time():
        return "the transfer handle's lease has run out"
    return None


def _too_long(n: int, limits: FrontendLimits) -> str:
    return (
        f"the prompt has {n} tokens; max_model_len is {limits.max_model_len} "
        "(prompt must be shorter)"
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "SAMPLING_CHECKS",
    "FrontendLimits",
    "check_prompt",
    "check_request",
    "check_sampling",
    "normalize_sampling",
    "representable",
    "validate",
    "validate_handle",
    "validate_sampling_options",
]
