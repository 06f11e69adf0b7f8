"""Chat templates rendered as Hugging Face `apply_chat_template` renders them.

The template comes from an explicit Jinja file, else the model directory's
`chat_template.jinja`, else `chat_template` in its `tokenizer_config.json` (a string, or a list
of named templates of which "default" is used). It renders in a sandboxed Jinja environment
with the same options, filters and globals as transformers (trim_blocks, lstrip_blocks,
loopcontrols, `tojson`, `raise_exception`, `strftime_now`, the `{% generation %}` tag) and the
tokenizer's special tokens as variables; the rendered text is tokenized without adding special
tokens, so the template alone decides where BOS goes.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """No template, or a template that does not render for these messages."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, Any]) -> None:
        self.source = source
        self.special_tokens = special_tokens
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not parse: {exc}") from None

    @classmethod
    def load(cls, model_dir: str | None, template_file: str | None = None) -> ChatTemplate | None:
        """The model's chat template, or None when it has none."""
        config: dict[str, Any] = {}
        if model_dir:
            path = Path(model_dir) / "tokenizer_config.json"
            if path.is_file():
                config = json.loads(path.read_text())
        special: dict[str, Any] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                special[key] = text
        extra = config.get("additional_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [_token_text(t) for t in extra]
        source = None
        if template_file:
            source = Path(template_file).read_text()
        elif model_dir and (Path(model_dir) / "chat_template.jinja").is_file():
            source = (Path(model_dir) / "chat_template.jinja").read_text()
        else:
            source = _pick(config.get("chat_template"))
        return None if source is None else cls(source, special)

    @cached_property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed for these messages: {exc}") from None


def _pick(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as templates expect them: text parts of a content list joined into one string."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatTemplateError(
                        f"messages[{i}].content: only text parts are supported, got {kind!r}"
                    )
                texts.append(str(part.get("text", "")))
            m = {**m, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of parts")
        out.append(m)
    return out
