"""One HTTP process's state: the client to the node and what it knows of the model."""

from __future__ import annotations

import asyncio
import time

from greenroom.bus.messages import ServerInfo
from greenroom.client import AsyncClient, GreenroomError
from greenroom.http.chat_template import ChatTemplate
from greenroom.http.errors import ApiError, unavailable
from greenroom.http.generation import Generation
from greenroom.http.metrics import HttpMetrics
from greenroom.http.settings import HttpSettings
from greenroom.http.text import TextCodec


class ServerState:
    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.client = AsyncClient(settings.node_address, timeout=settings.request_timeout_s)
        self.codec = TextCodec.load(settings.model_path)
        self.template = ChatTemplate.load(settings.model_path, settings.chat_template)
        self._info: ServerInfo | None = None
        self._info_lock = asyncio.Lock()
        self._metrics: HttpMetrics | None = None
        self._generation: Generation | None = None
        self.created = int(time.time())

    async def info(self) -> ServerInfo:
        """The node's ServerInfo (asked once; a 503 while the node does not answer)."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    try:
                        self._info = await asyncio.wait_for(
                            self.client.server_info(), self.settings.health_timeout_s
                        )
                    except (GreenroomError, TimeoutError) as exc:
                        raise unavailable(f"the node does not answer: {exc}") from None
        return self._info

    async def model_name(self) -> str:
        return self.settings.served_model_name or (await self.info()).model_name

    async def checked_model(self, requested: str | None) -> str:
        """The served model's name; a 404 when the request names another model."""
        model = await self.model_name()
        if requested is not None and requested != model:
            raise ApiError(
                404,
                f"the model {requested!r} does not exist here (this server serves {model!r})",
                "model_not_found",
                "model",
            )
        return model

    async def generation(self) -> Generation:
        if self._generation is None:
            self._metrics = HttpMetrics(await self.model_name())
            self._generation = Generation(self.client, self._metrics)
        return self._generation

    async def metrics(self) -> HttpMetrics:
        return (await self.generation()).metrics

    async def close(self) -> None:
        await self.client.close()
