"""Request bodies of the OpenAI API (the fields greenroom reads; unknown fields are ignored).

Bodies are decoded with msgspec; a type error becomes a 400 naming the field. Fields marked
"extension" are vLLM's additions that load testers and peers send.
"""

from __future__ import annotations

from typing import Any

import msgspec

from greenroom.http.errors import invalid


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    temperature: float | None = None  # OpenAI's default is 1
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted and ignored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: int | None = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # each choice (and chunk) carries its token ids

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise invalid("stop strings must not be empty", "stop")
        return stops


class CompletionRequest(_Common, kw_only=True):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Common, kw_only=True):
    messages: list[dict[str, Any]] = []
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # passed to the chat template
    # extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


def decode_body(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """The request body as `kind`, or a 400 that says what is wrong with it."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        param = None
        if " - at `$." in msg:
            msg, where = msg.rsplit(" - at `$.", 1)
            param = where.rstrip("`")
            msg = f"{param}: {msg}"
        raise invalid(f"invalid request: {msg}", param) from None
    except msgspec.DecodeError as exc:
        raise invalid(f"the request body is not valid JSON: {exc}") from None


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completion's prompt field as a list of prompts (text or token ids)."""

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise invalid(
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists "
        "(none empty)",
        "prompt",
    )
