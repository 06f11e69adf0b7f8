"""A simulated server behind the client API, for trying the replay tool without a model.

It answers `server_info()` and `stream()` like `greenroom.client.AsyncClient`, with a simple
latency model (prefill time per uncached token, a decode interval per token that grows with
the number of requests in flight) and a prefix cache of full blocks keyed by chained hashes,
so prefix sharing in a trace shows up in the reported hit rate. The replay CLI uses it for
`--server sim://`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from greenroom.bus.messages import RequestMetrics, SamplingParams, ServerInfo, TokenDelta
from greenroom.client import Overloaded, RequestRejected


@dataclass(frozen=True)
class SimulatedServerConfig:
    model_name: str = "simulated"
    max_model_len: int = 4096
    vocab_size: int = 32000
    tokens_per_block: int = 16
    num_blocks: int = 4096  # prefix cache capacity (LRU)
    prefill_s_per_token: float = 2e-5
    prefill_base_s: float = 1e-3
    decode_s: float = 2e-3  # per token, alone
    decode_slowdown: float = 0.05  # extra decode time per other request in flight
    max_in_flight: int | None = None  # more than this: "overloaded"


class SimulatedClient:
    """Streams token deltas with simulated timing; see the module docstring."""

    def __init__(self, config: SimulatedServerConfig | None = None) -> None:
        self.config = config or SimulatedServerConfig()
        self._cache: OrderedDict[int, None] = OrderedDict()
        self.in_flight = 0
        self.max_seen_in_flight = 0

    async def __aenter__(self) -> SimulatedClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._cache.clear()

    async def server_info(self) -> ServerInfo:
        c = self.config
        return ServerInfo(
            request_id=uuid.uuid4().hex,
            model_name=c.model_name,
            max_model_len=c.max_model_len,
            vocab_size=c.vocab_size,
            num_blocks=c.num_blocks,
            tokens_per_block=c.tokens_per_block,
            device="simulated",
        )

    def _admit(self, prompt: list[int], max_tokens: int) -> RequestMetrics:
        """Match and insert full prompt blocks (the last prompt token is always computed)."""
        bpt = self.config.tokens_per_block
        full = (len(prompt) - 1) // bpt
        reused = 0
        parent = 0
        hashes = []
        for b in range(full):
            parent = hash((parent, tuple(prompt[b * bpt : (b + 1) * bpt])))
            hashes.append(parent)
            if reused == b and parent in self._cache:
                reused += 1
                self._cache.move_to_end(parent)
        for h in hashes[reused:]:
            self._cache[h] = None
        while len(self._cache) > self.config.num_blocks:
            self._cache.popitem(last=False)
        total_blocks = -(-(len(prompt) + max_tokens) // bpt)
        return RequestMetrics(
            num_prompt_tokens=len(prompt),
            num_output_tokens=max_tokens,
            num_cached_tokens=reused * bpt,
            reused_blocks=reused,
            new_blocks=total_blocks - reused,
            missed_blocks=full - reused,
        )

    async def stream(
        self,
        prompt_token_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 35,
        **_: object,
    ) -> AsyncIterator[TokenDelta]:
        c = self.config
        sampling = sampling or SamplingParams()
        prompt = list(prompt_token_ids or [])
        rid = request_id or uuid.uuid4().hex
        if not prompt:
            raise RequestRejected("empty prompt", rid)
        if len(prompt) + sampling.max_tokens > c.max_model_len:
            raise RequestRejected(
                f"prompt ({len(prompt)}) + max_tokens ({sampling.max_tokens}) exceeds "
                f"max_model_len ({c.max_model_len})",
                rid,
            )
        if max(prompt) >= c.vocab_size or min(prompt) < 0:
            raise RequestRejected("token id outside the vocabulary", rid)
        if c.max_in_flight is not None and self.in_flight >= c.max_in_flight:
            raise Overloaded(f"{self.in_flight} requests in flight", rid)
        self.in_flight += 1
        self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
        try:
            metrics = self._admit(prompt, sampling.max_tokens)
            uncached = len(prompt) - metrics.num_cached_tokens
            await asyncio.sleep(c.prefill_base_s + uncached * c.prefill_s_per_token)
            token = sum(prompt[-4:]) % c.vocab_size
            for i in range(sampling.max_tokens):
                if i:
                    others = self.in_flight - 1
                    await asyncio.sleep(c.decode_s * (1.0 + c.decode_slowdown * others))
                token = (token * 31 + 7) % c.vocab_size
                last = i == sampling.max_tokens - 1
                yield TokenDelta(
                    request_id=rid,
                    token_ids=[token],
                    finish_reason="length" if last else None,
                    metrics=metrics if last else None,
                )
        finally:
            self.in_flight -= 1
