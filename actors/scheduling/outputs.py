"""Collects one call's token deltas and errors into a single OutputBatch."""

from __future__ import annotations

from greenroom.actors.scheduling.request import Request
from greenroom.bus.messages import (
    OutputBatch,
    RequestError,
    TokenDelta,
    TokenLogprobs,
    TransferDone,
    TransferHandle,
)

ERROR_KINDS = ("invalid", "overloaded", "timeout", "failed", "aborted")


class OutputCollector:
    __slots__ = ("deltas", "errors", "handles", "transfers")

    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []
        self.errors: list[RequestError] = []
        self.handles: list[TransferHandle] = []
        self.transfers: list[TransferDone] = []

    def token(self, r: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """A new token; the final delta carries finish_reason and metrics when finished."""
        lp = [logprobs] if logprobs is not None and r.sampling.logprobs > 0 else None
        self.deltas.append(
            TokenDelta(
                request_id=r.client_id,
                token_ids=[token],
                logprobs=lp,
                finish_reason=r.finish_reason,
                metrics=r.metrics() if r.finish_reason else None,
                index=r.sample_index,
            )
        )

    def final(self, r: Request, finish_reason: str) -> None:
        """A final delta without a token: aborted, or stopped by the frontend (stop string)."""
        self.deltas.append(
            TokenDelta(
                request_id=r.client_id,
                token_ids=[],
                finish_reason=finish_reason,
                metrics=r.metrics(),
                index=r.sample_index,
            )
        )

    def error(self, r: Request, kind: str, message: str) -> None:
        """Errors name the client's request: one failed sample fails an n > 1 request."""
        self.errors.append(RequestError(request_id=r.client_id, kind=kind, message=message))

    def batch(self) -> OutputBatch:
        return OutputBatch(
            deltas=self.deltas, errors=self.errors, handles=self.handles, transfers=self.transfers
        )


class Undelivered:
    """Outputs decided outside a call that returns a batch (a prompt that can never fit, a
    lease to hand out, a receive ended unread): the next batch carries them."""

    __slots__ = ("errors", "handles", "transfers")

    def __init__(self) -> None:
        self.errors: list[RequestError] = []
        self.handles: list[TransferHandle] = []
        self.transfers: list[TransferDone] = []

    def __bool__(self) -> bool:
        return bool(self.errors or self.handles or self.transfers)

    def deliver(self, out: OutputCollector) -> OutputCollector:
        """Move everything held into ``out``; the lists stay the same objects, emptied."""
        out.errors.extend(self.errors)
        out.handles.extend(self.handles)
        out.transfers.extend(self.transfers)
        self.errors.clear()
        self.handles.clear()
        self.transfers.clear()
        return out
