"""Activations between pipeline stages: stage k sends each micro-batch's hidden state and
residual to stage k+1 through torch.distributed point-to-point (gloo on the CPU, NCCL on
GPUs), rank to the rank of the same (cp, tp) place in the next stage.

Every stage runs the plans in the same order, so sends and receives pair up in order; each
transfer starts with a header (micro-batch id, token count) the receiver checks, so a stage
that ran a different micro-batch fails loudly instead of computing on another one's
activations. Sends are asynchronous (a stage goes on to its next micro-batch while the next
stage receives); a receive waits at most the collective timeout, so a stage that died between
a send and its receive is an error, never a hang.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from typing import Any

import torch

from greenroom.parallel.layout import RankLayout

MAX_PENDING_SENDS = 8


class StageMismatch(RuntimeError):
    """The previous stage sent another micro-batch than the one this stage runs."""


class StageLink:
    def __init__(
        self,
        layout: RankLayout,
        rank: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        timeout_s: float,
    ) -> None:
        c = layout.coords(rank)
        self.prev = layout.rank_of(c.pp - 1, c.cp, c.tp) if c.pp > 0 else None
        self.next = layout.rank_of(c.pp + 1, c.cp, c.tp) if c.pp < layout.pp_size - 1 else None
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.timeout = timedelta(seconds=timeout_s)
        self._sends: deque[tuple[list[Any], tuple[torch.Tensor, ...]]] = deque()

    def recv(self, micro_batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous stage's (hidden, residual) ``[num_tokens, hidden]`` of ``micro_batch``."""
        import torch.distributed as dist

        assert self.prev is not None
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        dist.irecv(header, src=self.prev).wait(self.timeout)
        got = tuple(header.tolist())
        if got != (micro_batch, num_tokens):
            raise StageMismatch(
                f"stage input out of order: got micro-batch {got[0]} of {got[1]} tokens, "
                f"expected {micro_batch} of {num_tokens}"
            )
        buf = torch.empty((2, num_tokens, self.hidden_size), dtype=self.dtype, device=self.device)
        dist.irecv(buf, src=self.prev).wait(self.timeout)
        return buf[0], buf[1]

    def send(self, micro_batch: int, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        import torch.distributed as dist

        assert self.next is not None
        header = torch.tensor([micro_batch, hidden.shape[0]], dtype=torch.int64)
        header = header.to(self.device)
        buf = torch.stack([hidden, residual])
        works = [dist.isend(header, dst=self.next), dist.isend(buf, dst=self.next)]
        self._sends.append((works, (header, buf)))  # the tensors live until sent
        while len(self._sends) > MAX_PENDING_SENDS:
            self._wait_oldest()
        while self._sends and all(w.is_completed() for w in self._sends[0][0]):
            self._sends.popleft()

    def _wait_oldest(self) -> None:
        works, _ = self._sends.popleft()
        for w in works:
            w.wait(self.timeout)
