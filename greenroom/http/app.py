"""The ASGI application of one HTTP server process (FastAPI)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from greenroom.bus.messages import SamplingParams
from greenroom.client import GreenroomError
from greenroom.http.chat import create_chat_completion
from greenroom.http.completions import create_completion
from greenroom.http.errors import ApiError, unavailable
from greenroom.http.metrics import CONTENT_TYPE
from greenroom.http.protocol import ChatRequest, CompletionRequest, decode_body
from greenroom.http.settings import HttpSettings
from greenroom.http.state import ServerState
from greenroom.logging import get_logger

log = get_logger(__name__)
_encode = msgspec.json.Encoder().encode


def _json(body: dict, status: int = 200) -> Response:
    return Response(_encode(body), status_code=status, media_type="application/json")


class ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable):
    """Run `work`; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def _respond(request: Request, work: Awaitable) -> Response:
    try:
        result = await _until_disconnect(request, work)
    except ClientGone:
        return Response(status_code=499)
    if isinstance(result, dict):
        return _json(result)
    return EventStream(result)


class EventStream(Response):
    """An SSE response: each frame is one ASGI send. A client that disconnects cancels the
    stream (its node requests are aborted); one watcher task per response."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes]) -> None:  # no body: no content-length
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ]
        self.frames = frames

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            streaming.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            streaming.uncancel()
        except OSError:  # the connection broke under a send
            pass
        finally:
            watcher.cancel()
            await self.frames.aclose()


class Health:
    """/health: 200 only when the node answers end to end. Node stats prove the frontend,
    scheduler and KV manager; tokens generated since the last check prove the engine, else a
    one-token request does."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._last_tokens = -1

    async def check(self) -> None:
        s = self.state
        timeout = s.settings.health_timeout_s
        try:
            stats = await s.client.node_stats(timeout=timeout)
            progressed = stats.generation_tokens > self._last_tokens >= 0
            self._last_tokens = stats.generation_tokens
            if not progressed:
                probe = s.client.generate([0], SamplingParams(max_tokens=1, ignore_eos=True))
                await asyncio.wait_for(probe, timeout)
        except (GreenroomError, TimeoutError) as exc:
            raise unavailable(f"the node does not answer: {exc or type(exc).__name__}") from None


def create_app(settings: HttpSettings | None = None) -> FastAPI:
    settings = settings or HttpSettings.from_env()
    state = ServerState(settings)
    health = Health(state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await state.close()

    app = FastAPI(title="greenroom", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.greenroom = state

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return _json(exc.body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _json(
            ApiError(exc.status_code, str(exc.detail), "invalid_request_error").body(),
            exc.status_code,
        )

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        log.error("request failed", error=repr(exc))
        return _json(ApiError(500, f"internal error: {exc!r}", "internal_error").body(), 500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.perf_counter()
        req = decode_body(await request.body(), CompletionRequest)
        return await _respond(request, create_completion(state, req, arrival))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.perf_counter()
        req = decode_body(await request.body(), ChatRequest)
        return await _respond(request, create_chat_completion(state, req, arrival))

    @app.get("/v1/models")
    async def models() -> Response:
        info = await state.info()
        name = await state.model_name()
        card = {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "greenroom",
            "root": info.model_name,
            "max_model_len": info.max_model_len,
            "vocab_size": info.vocab_size,
        }
        return _json({"object": "list", "data": [card]})

    @app.get("/health")
    async def health_check() -> Response:
        await health.check()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await state.client.node_stats(timeout=settings.health_timeout_s)
        except GreenroomError:
            stats = None
        m = await state.metrics()
        return Response(m.render(stats), media_type=CONTENT_TYPE)

    return app
