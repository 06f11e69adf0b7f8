"""POST /v1/chat/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from greenroom.http.chat_template import ChatTemplateError, normalize_messages
from greenroom.http.errors import invalid
from greenroom.http.generation import (
    ChoiceEvent,
    Usage,
    prompt_jobs,
    sampling_params,
    token_strings,
)
from greenroom.http.protocol import ChatRequest
from greenroom.http.serving import chunk_builder, collect, first_event, sse_stream
from greenroom.http.state import ServerState
from greenroom.http.text import TextCodec


def render_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    """The chat rendered by the model's template and tokenized as Hugging Face does."""
    if state.template is None:
        raise invalid(
            "this model has no chat template (no chat_template in tokenizer_config.json); use "
            "/v1/completions or give the server a template file (http.chat_template)",
            "messages",
        )
    if state.codec is None:
        raise invalid("chat needs a tokenizer.json in the model directory", "messages")
    if not req.messages:
        raise invalid("messages must not be empty", "messages")
    try:
        text = state.template.render(
            normalize_messages(req.messages),
            add_generation_prompt=req.add_generation_prompt,
            tools=req.tools,
            **(req.chat_template_kwargs or {}),
        )
    except ChatTemplateError as exc:
        raise invalid(str(exc), "messages") from None
    return state.codec.encode(text, add_special_tokens=False)


async def create_chat_completion(
    state: ServerState, req: ChatRequest, arrival: float
) -> dict | AsyncIterator[bytes]:
    info = await state.info()
    model = await state.checked_model(req.model)
    prompt = render_prompt(state, req)
    codec = state.codec
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs needs logprobs = true", "top_logprobs")
    k = req.top_logprobs or 0
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = limit if limit is not None else max(1, info.max_model_len - len(prompt))
    sampling = sampling_params(req, max_tokens, max(k, 1) if req.logprobs else 0)
    jobs = prompt_jobs([prompt], sampling)
    usage = Usage(prompt_tokens=len(prompt))
    gen = await state.generation()
    events = gen.run(jobs, arrival)
    first = await first_event(events)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def logprobs(token_ids: list[int], lps) -> dict | None:
        if not req.logprobs:
            return None
        return {"content": chat_logprobs(codec, token_ids, lps or [], k), "refusal": None}

    if req.stream:
        started: set[int] = set()

        chunk = chunk_builder(rid, "chat.completion.chunk", created, model, req.include_usage)

        def chunks(ev: ChoiceEvent):
            usage.add(ev)
            if ev.index not in started:
                started.add(ev.index)
                yield chunk(
                    [
                        {
                            "index": ev.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            if not ev.text and not ev.token_ids and ev.finish_reason is None:
                return
            delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
            c = {
                "index": ev.index,
                "delta": delta,
                "logprobs": logprobs(ev.token_ids, ev.logprobs),
                "finish_reason": ev.finish_reason,
            }
            if req.return_token_ids:
                c["token_ids"] = ev.token_ids
            yield chunk([c])

        def final():
            if req.include_usage:
                yield chunk([], usage.body())

        return sse_stream(events, first, chunks, final)

    outputs = await collect(events, first, len(jobs) * req.n, usage)
    choices = []
    for i, out in enumerate(outputs):
        c = {
            "index": i,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": logprobs(out.token_ids, out.logprobs),
            "finish_reason": out.finish_reason,
        }
        if req.return_token_ids:
            c["token_ids"] = out.token_ids
        choices.append(c)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.body(),
    }


def chat_logprobs(codec: TextCodec | None, token_ids: list[int], lps: list, k: int) -> list[dict]:
    tokens = token_strings(codec, token_ids)
    out = []
    for tok, lp in zip(tokens, lps, strict=False):
        tops = token_strings(codec, lp.top_token_ids[:k])
        out.append(
            {
                "token": tok,
                "logprob": lp.token_logprob,
                "bytes": list(tok.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())}
                    for t, v in zip(tops, lp.top_logprobs[:k], strict=False)
                ],
            }
        )
    return out
