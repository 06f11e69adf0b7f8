"""The flow shared by the completion endpoints: first event, then a body or an SSE stream.

The first event is awaited before any response starts, so a request the node rejects gets its
real status code (400, 503, ...) instead of an error inside a 200 stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from greenroom.bus.messages import TokenLogprobs
from greenroom.client import GreenroomError
from greenroom.http.errors import ApiError, from_greenroom
from greenroom.http.generation import ChoiceEvent, Usage

DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def sse(obj: dict) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def chunk_builder(
    rid: str, obj: str, created: int, model: str, include_usage: bool
) -> Callable[..., dict]:
    """The streamed chunk body of one response: its choices, and the usage when asked for."""

    def chunk(choices: list, usage_body: dict | None = None) -> dict:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage_body
        return body

    return chunk


async def first_event(events: AsyncIterator[ChoiceEvent]) -> ChoiceEvent:
    """The first event, or the ApiError the request ended with (closing the events)."""
    try:
        return await anext(events)
    except GreenroomError as exc:
        await events.aclose()
        raise from_greenroom(exc) from None
    except StopAsyncIteration:
        raise ApiError(500, "the request ended without output", "internal_error") from None
    except BaseException:
        await events.aclose()
        raise


@dataclass
class ChoiceOutput:
    """Everything one choice produced (non-streaming responses)."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def collect(
    events: AsyncIterator[ChoiceEvent], first: ChoiceEvent, num_choices: int, usage: Usage
) -> list[ChoiceOutput]:
    outputs = [ChoiceOutput() for _ in range(num_choices)]
    try:
        ev: ChoiceEvent | None = first
        while ev is not None:
            out = outputs[ev.index]
            out.texts.append(ev.text)
            out.token_ids.extend(ev.token_ids)
            if ev.logprobs:
                out.logprobs.extend(ev.logprobs)
            if ev.finish_reason is not None:
                out.finish_reason = ev.finish_reason
            usage.add(ev)
            ev = await anext(events, None)
    except GreenroomError as exc:
        raise from_greenroom(exc) from None
    finally:
        await events.aclose()
    return outputs


async def sse_stream(
    events: AsyncIterator[ChoiceEvent],
    first: ChoiceEvent,
    chunks: Callable[[ChoiceEvent], Iterable[dict]],
    final: Callable[[], Iterable[dict]],
) -> AsyncIterator[bytes]:
    """SSE frames: the chunks of every event, the final chunks, then [DONE]. An error after
    the stream started goes out as an error object before [DONE]."""
    try:
        for chunk in chunks(first):
            yield sse(chunk)
        async for ev in events:
            for chunk in chunks(ev):
                yield sse(chunk)
        for chunk in final():
            yield sse(chunk)
    except GreenroomError as exc:
        yield sse(from_greenroom(exc).body())
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
    yield DONE
