"""What each HTTP server process needs, passed from the launcher to its workers."""

from __future__ import annotations

import os

import msgspec

ENV = "GREENROOM_HTTP_SETTINGS"  # launcher -> worker processes (uvicorn spawns the workers)


class HttpSettings(msgspec.Struct, frozen=True, kw_only=True):
    node_address: str  # the frontend's ZeroMQ address
    model_path: str | None = None  # tokenizer.json and the chat template come from here
    served_model_name: str | None = None
    chat_template: str | None = None
    health_timeout_s: float = 5.0
    request_timeout_s: float = 600.0

    def to_env(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_env(cls) -> HttpSettings:
        raw = os.environ.get(ENV)
        if not raw:
            raise RuntimeError(f"{ENV} is not set: start the server with greenroom.http.launcher")
        return msgspec.json.decode(raw, type=cls)
