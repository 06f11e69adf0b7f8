"""POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from greenroom.http.errors import invalid
from greenroom.http.generation import (
    ChoiceEvent,
    Usage,
    prompt_jobs,
    sampling_params,
    token_strings,
)
from greenroom.http.protocol import CompletionRequest, prompt_list
from greenroom.http.serving import chunk_builder, collect, first_event, sse_stream
from greenroom.http.state import ServerState
from greenroom.http.text import TextCodec


async def create_completion(
    state: ServerState, req: CompletionRequest, arrival: float
) -> dict | AsyncIterator[bytes]:
    info = await state.info()
    model = await state.checked_model(req.model)
    if req.echo:
        raise invalid("echo is not supported", "echo")
    if req.suffix:
        raise invalid("suffix is not supported", "suffix")
    if req.best_of not in (None, req.n):
        raise invalid("best_of is not supported (must equal n)", "best_of")
    if req.prompt is None:
        raise invalid("prompt is required", "prompt")
    codec = state.codec
    stops = req.stop_strings()
    if stops and codec is None:
        raise invalid("stop strings need a tokenizer.json in the model directory", "stop")
    prompts: list[list[int]] = []
    for p in prompt_list(req.prompt):
        if isinstance(p, str):
            if codec is None:
                raise invalid(
                    "text prompts need a tokenizer.json in the model directory; send token ids",
                    "prompt",
                )
            p = codec.encode(p)
        prompts.append(p)
    k = req.logprobs
    if req.max_tokens is not None:
        max_tokens = req.max_tokens
    else:
        max_tokens = max(1, info.max_model_len - max(len(p) for p in prompts))
    sampling = sampling_params(req, max_tokens, 0 if k is None else max(k, 1))
    jobs = prompt_jobs(prompts, sampling)
    usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
    gen = await state.generation()
    events = gen.run(jobs, arrival)
    first = await first_event(events)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    num_choices = len(jobs) * req.n
    offsets = [0] * num_choices

    def logprobs(ev_index: int, token_ids: list[int], lps) -> dict | None:
        if k is None:
            return None
        return completion_logprobs(codec, token_ids, lps or [], k, offsets, ev_index)

    def choice(ev: ChoiceEvent) -> dict:
        c = {
            "index": ev.index,
            "text": ev.text,
            "logprobs": logprobs(ev.index, ev.token_ids, ev.logprobs),
            "finish_reason": ev.finish_reason,
        }
        if req.return_token_ids:
            c["token_ids"] = ev.token_ids
        return c

    chunk = chunk_builder(rid, "text_completion", created, model, req.include_usage)

    if req.stream:

        def chunks(ev: ChoiceEvent):
            usage.add(ev)
            yield chunk([choice(ev)])

        def final():
            if req.include_usage:
                yield chunk([], usage.body())

        return sse_stream(events, first, chunks, final)

    outputs = await collect(events, first, len(jobs) * req.n, usage)
    choices = []
    for i, out in enumerate(outputs):
        c = {
            "index": i,
            "text": out.text,
            "logprobs": logprobs(i, out.token_ids, out.logprobs),
            "finish_reason": out.finish_reason,
        }
        if req.return_token_ids:
            c["token_ids"] = out.token_ids
        choices.append(c)
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.body(),
    }


def completion_logprobs(
    codec: TextCodec | None, token_ids: list[int], lps: list, k: int, offsets: list[int], index: int
) -> dict:
    """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens = token_strings(codec, token_ids)
    top: list[dict[str, float]] = []
    text_offset: list[int] = []
    for tok, lp in zip(tokens, lps, strict=False):
        entry = dict(
            zip(token_strings(codec, lp.top_token_ids[:k]), lp.top_logprobs[:k], strict=False)
        )
        entry.setdefault(tok, lp.token_logprob)
        top.append(entry)
        text_offset.append(offsets[index])
        offsets[index] += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.token_logprob for lp in lps],
        "top_logprobs": top,
        "text_offset": text_offset,
    }
