"""Requests with ``n > 1``: one client request becomes n samples sharing its prompt.

All samples but the first wait until the first's prompt is scheduled, so that they are
admitted onto its cached prompt blocks; a client's id names every sample of its request.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from greenroom.actors.scheduling.request import Request
from greenroom.bus.messages import SubmitRequest, sample_request_id


def sample_of(req: SubmitRequest, index: int) -> SubmitRequest:
    """Sample ``index`` of an n-sample request: its own id and seed (seed + index)."""
    n = req.sampling.n
    if n == 1:
        return req
    seed = req.sampling.seed
    sampling = msgspec.structs.replace(
        req.sampling, n=1, seed=None if seed is None else (seed + index) % (1 << 63)
    )
    return msgspec.structs.replace(
        req, request_id=sample_request_id(req.request_id, index, n), sampling=sampling
    )


class SampleGroups:
    """The samples of each live n > 1 request, and those held back behind their first."""

    __slots__ = ("_followers", "_groups")

    def __init__(self) -> None:
        self._groups: dict[str, list[Request]] = {}  # client id -> its samples
        self._followers: dict[str, list[Request]] = {}  # first sample's id -> samples held back

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._groups

    def split(self, req: SubmitRequest, max_model_len: int) -> list[Request]:
        """The samples of ``req`` (itself alone when n == 1), not yet recorded."""
        samples = [Request(sample_of(req, i), max_model_len) for i in range(req.sampling.n)]
        for i, r in enumerate(samples):
            r.client_id, r.sample_index = req.request_id, i
        return samples

    def add(self, samples: list[Request]) -> None:
        """Record an n > 1 request's samples: the first is queued, the others follow it."""
        if len(samples) > 1:
            self._groups[samples[0].client_id] = samples
            self._followers[samples[0].request_id] = samples[1:]

    def members(self, request_id: str, requests: dict[str, Request]) -> list[Request]:
        """The samples a client's id names, or the one request ``request_id`` is."""
        group = self._groups.get(request_id)
        if group is not None:
            return group
        r = requests.get(request_id)
        return [r] if r is not None else []

    def release(self, first: Request, waiting: OrderedDict[str, Request]) -> None:
        """The first sample's prompt is scheduled (or it ended): queue the others next."""
        for r in reversed(self._followers.pop(first.request_id, [])):
            if not r.state.terminal:
                waiting[r.request_id] = r
                waiting.move_to_end(r.request_id, last=False)

    def ended(self, r: Request, waiting: OrderedDict[str, Request]) -> None:
        """A sample ended: its followers go on without it; a group all ended is forgotten."""
        self.release(r, waiting)
        group = self._groups.get(r.client_id)
        if group is not None and all(m.state.terminal for m in group):
            del self._groups[r.client_id]
