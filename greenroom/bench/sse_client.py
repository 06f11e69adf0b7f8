"""A lean streaming client for `POST /v1/completions` (HTTP/1.1 over one asyncio connection per
request, chunked SSE parsed by hand), so the HTTP benchmark measures the server rather than a
general-purpose client library's per-chunk cost. The replay tool uses httpx
(greenroom.replay.openai_client), which speaks to any server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import msgspec

from greenroom.bus.messages import SamplingParams, TokenDelta
from greenroom.client import RequestFailed

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class LeanSSEClient:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80

    async def stream(
        self, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        body = _encode(
            {
                "prompt": prompt_token_ids,
                "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "ignore_eos": sampling.ignore_eos,
                "stream": True,
                "return_token_ids": True,
            }
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (self.host.encode(), len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RequestFailed(head.split(b"\r\n", 1)[0].decode())
            chunked = b"transfer-encoding: chunked" in head.lower()
            buf = b""
            while True:
                if chunked:
                    size = int((await reader.readline()).strip(), 16)
                    if size == 0:
                        return
                    data = await reader.readexactly(size + 2)
                    buf += data[:-2]
                else:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    payload = event[6:]  # "data: "
                    if payload == b"[DONE]":
                        return
                    for choice in _decode(payload).get("choices") or ():
                        yield TokenDelta(
                            request_id="",
                            token_ids=choice.get("token_ids") or [],
                            finish_reason=choice.get("finish_reason"),
                        )
        finally:
            writer.close()
