"""Logging: JSON vs console rendering, request ids bound while an actor handles a message."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from greenroom.actors import Actor, Runtime, handles
from greenroom.bus.messages import CancelRequests, SamplingParams, SubmitRequest, TokenDelta
from greenroom.logging import configure_logging, get_logger


@pytest.fixture
def stream():
    buf = io.StringIO()
    yield buf
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_greenroom", False)]:
        root.removeHandler(handler)
    structlog.reset_defaults()


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_auto_is_json_when_not_a_terminal(stream: io.StringIO) -> None:
    configure_logging("auto", "info", stream=stream)
    get_logger("greenroom.test").info("hello", answer=42)
    (record,) = lines(stream)
    assert record["event"] == "hello" and record["answer"] == 42
    assert record["level"] == "info" and record["logger"] == "greenroom.test"
    assert "timestamp" in record


def test_console_format_and_level_filter(stream: io.StringIO) -> None:
    configure_logging("console", "warning", stream=stream)
    log = get_logger("greenroom.test")
    log.info("hidden")
    log.warning("shown", k="v")
    text = stream.getvalue()
    assert "hidden" not in text and "shown" in text and "k=v" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_stdlib_records_use_the_same_renderer(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    logging.getLogger("some.library").warning("from stdlib %s", "logging")
    (record,) = lines(stream)
    assert record["event"] == "from stdlib logging" and record["level"] == "warning"


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml", "info")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "loud")


class Chatty(Actor):
    @handles(TokenDelta, SubmitRequest, CancelRequests)
    def log_it(self, msg) -> None:
        self.log.info("handling", kind=type(msg).__name__)

    @handles(SamplingParams)
    def untagged(self, msg) -> None:
        self.log.info("no ids")


async def test_request_ids_are_bound_per_handled_message(stream: io.StringIO) -> None:
    configure_logging("json", "info", stream=stream)
    rt = Runtime()
    try:
        ref = await rt.spawn(Chatty, name="chatty")
        await ref.ask(TokenDelta(request_id="req-1", token_ids=[1]), timeout=2.0)
        await ref.ask(CancelRequests(request_ids=["a", "b"]), timeout=2.0)
        await ref.ask(SamplingParams(), timeout=2.0)
        get_logger("outside").info("after")
    finally:
        await rt.shutdown()
    records = [r for r in lines(stream) if r["event"] in ("handling", "no ids", "after")]
    assert records[0]["request_id"] == "req-1" and records[0]["actor"] == "chatty"
    assert records[1]["request_ids"] == ["a", "b"] and "request_id" not in records[1]
    assert "request_id" not in records[2] and "request_ids" not in records[2]
    assert "request_id" not in records[3] and "actor" not in records[3]
