"""The replay driver's client for any OpenAI-compatible server (greenroom's, vLLM, SGLang, ...).

Each trace request is one streaming `POST /v1/completions` with the prompt as token ids,
`ignore_eos` and `stream_options.include_usage`; every SSE chunk becomes a `TokenDelta`. A
chunk counts as many tokens as its `token_ids` (greenroom and vLLM send them when asked with
`return_token_ids`), else one token per chunk with text; the final delta carries the usage
(prompt, output and cached tokens) as `RequestMetrics`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from greenroom.bus.messages import RequestMetrics, SamplingParams, ServerInfo, TokenDelta
from greenroom.client import (
    GreenroomError,
    Overloaded,
    RequestFailed,
    RequestRejected,
    RequestTimeout,
)


def _error(status: int, body: bytes) -> GreenroomError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:500]
    message = f"HTTP {status}: {message}"
    if status in (400, 404, 422):
        return RequestRejected(message)
    if status in (429, 503):
        return Overloaded(message)
    if status in (408, 504):
        return RequestTimeout(message)
    return RequestFailed(message)


class OpenAIClient:
    """`async with OpenAIClient("http://127.0.0.1:8000") as c:` then `c.stream(...)`."""

    def __init__(
        self,
        server: str,
        *,
        model: str | None = None,
        timeout: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        base = server.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
        )

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def server_info(self) -> ServerInfo:
        """The served model from /v1/models (max_model_len and vocab_size when reported)."""
        try:
            r = await self._http.get("/models")
        except httpx.HTTPError as exc:
            raise RequestFailed(f"no answer from {self.base_url}: {exc!r}") from None
        if r.status_code != 200:
            raise _error(r.status_code, r.content)
        cards = r.json().get("data") or []
        card = next((c for c in cards if c.get("id") == self.model), cards[0] if cards else None)
        if card is None:
            raise RequestFailed(f"{self.base_url}/models lists no model")
        if self.model is None:
            self.model = card["id"]
        return ServerInfo(
            request_id="",
            model_name=card["id"],
            max_model_len=int(card.get("max_model_len") or 0),
            vocab_size=int(card.get("vocab_size") or 0),
            num_blocks=0,
            tokens_per_block=0,
            device="",
        )

    async def stream(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 35,
        prompt: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        s = sampling or SamplingParams()
        body: dict = {
            "prompt": prompt if prompt is not None else prompt_token_ids,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": s.ignore_eos,
            "return_token_ids": True,
        }
        if self.model is not None:
            body["model"] = self.model
        if s.seed is not None:
            body["seed"] = s.seed
        rid = request_id or ""
        finish: str | None = None
        usage: dict | None = None
        try:
            async with self._http.stream("POST", "/completions", json=body) as r:
                if r.status_code != 200:
                    raise _error(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise _error(int(err.get("code") or 500), json.dumps(chunk).encode())
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        ids = choice.get("token_ids")
                        if ids is None:
                            ids = [0] if choice.get("text") else []
                        finish = choice.get("finish_reason") or finish
                        if ids:
                            yield TokenDelta(request_id=rid, token_ids=list(ids))
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"{self.base_url}: {exc!r}", rid) from None
        except httpx.HTTPError as exc:
            raise RequestFailed(f"{self.base_url}: {exc!r}", rid) from None
        metrics = None
        if usage is not None:
            details = usage.get("prompt_tokens_details") or {}
            metrics = RequestMetrics(
                num_prompt_tokens=int(usage.get("prompt_tokens") or 0),
                num_output_tokens=int(usage.get("completion_tokens") or 0),
                num_cached_tokens=int(details.get("cached_tokens") or 0),
            )
        yield TokenDelta(request_id=rid, token_ids=[], finish_reason=finish, metrics=metrics)
