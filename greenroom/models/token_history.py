"""Per-sequence token history on the device, for repetition / presence / frequency penalties.

Only sequences that ask for a penalty get a row. A row holds which vocabulary ids the prompt
contains and how often each id was generated; it is filled once when the engine first sees the
sequence (its NewSequence carries the prompt and, after a preemption or handoff, the outputs so
far) and then grows by one scatter per step for the whole batch, on the device: the plans stay
diffs and nothing per token crosses to the host.
"""

from __future__ import annotations

import torch

from greenroom.models.host_copy import to_device


class TokenHistory:
    def __init__(self, vocab_size: int, device: torch.device | str, capacity: int = 4) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.prompt_seen = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(capacity, vocab_size, dtype=torch.float32, device=device)
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.prompt_seen.shape[0]

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def add(self, prompt: list[int], output: list[int]) -> int:
        """A row for a sequence with these prompt and output tokens; returns its slot."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.prompt_seen[slot].zero_()
        self.output_counts[slot].zero_()
        if prompt:
            ids = to_device(prompt, torch.int64, self.device)
            self.prompt_seen[slot].index_fill_(0, ids, True)
        if output:
            ids = to_device(output, torch.int64, self.device)
            ones = torch.ones(len(output), dtype=torch.float32, device=self.device)
            self.output_counts[slot].index_add_(0, ids, ones)
        return slot

    def remove(self, slot: int) -> None:
        self._free.append(slot)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more generated token per row: ``output_counts[slots[i], tokens[i]] += 1``."""
        ones = torch.ones(slots.shape[0], dtype=torch.float32, device=self.device)
        self.output_counts.index_put_((slots, tokens), ones, accumulate=True)

    def _grow(self) -> None:
        old = self.capacity
        new = max(4, 2 * old)
        seen = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(new, self.vocab_size, dtype=torch.float32, device=self.device)
        seen[:old] = self.prompt_seen
        counts[:old] = self.output_counts
        self.prompt_seen, self.output_counts = seen, counts
        self._free.extend(range(new - 1, old - 1, -1))
