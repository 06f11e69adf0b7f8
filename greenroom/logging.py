"""Structured logs: JSON lines in production, console rendering in development.

`configure_logging("auto")` renders JSON when the output stream is not a
terminal. Log records from the standard `logging` module (libraries) go through
the same renderer. Actors bind the request ids of the message they handle
(`bind_request_ids`), so every line logged while handling it carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

_settings: dict[str, str] = {"fmt": "auto", "level": "info", "stream": "stdout"}
_REQUEST_FIELDS = ("request_id", "request_ids")
_request_field: dict[type, str | None] = {}


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Set up structlog and the stdlib root logger. Safe to call again (reconfigures)."""
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, not {fmt!r}")
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not _isatty(stream))
    _settings.update(
        fmt="json" if as_json else "console",
        level=level,
        stream="stderr" if stream is sys.stderr else "stdout",
    )

    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(stream))
        tail = []

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_greenroom", False)]:
        root.removeHandler(old)
    handler._greenroom = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level_no)


def logging_settings() -> dict[str, str]:
    """The resolved settings of the last configure_logging call (child processes reuse them)."""
    return dict(_settings)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def bind_request_ids(msg: Any) -> dict[str, Any] | None:
    """Bind msg's `request_id` / `request_ids` field to the log context; returns the
    tokens for `unbind_request_ids`, or None when the message has neither."""
    cls = type(msg)
    try:
        field = _request_field[cls]
    except KeyError:
        fields = getattr(cls, "__struct_fields__", ())
        field = next((f for f in _REQUEST_FIELDS if f in fields), None)
        _request_field[cls] = field
    if field is None:
        return None
    return structlog.contextvars.bind_contextvars(**{field: getattr(msg, field)})


def unbind_request_ids(tokens: dict[str, Any]) -> None:
    structlog.contextvars.reset_contextvars(**tokens)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
