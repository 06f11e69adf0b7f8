"""Per-request logit changes before sampling: penalties, logit bias and the min_tokens mask.

Applied in this order, each as one batched op over the rows that use it:

- repetition penalty (as transformers' ``RepetitionPenaltyLogitsProcessor``): a token seen in
  the prompt or the output has its logit divided by the penalty when positive, multiplied
  when negative;
- presence and frequency penalties (as OpenAI defines them): ``logit -= frequency * count +
  presence * (count > 0)`` with ``count`` the token's occurrences in the output so far;
- logit bias: added to the named ids;
- min_tokens: EOS and stop ids get ``-inf`` until the sequence has ``min_tokens`` outputs.

A batch where no row asks for any of these builds nothing (``build`` returns None), so the
sampler's fast path does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from greenroom.bus.messages import SamplingParams
from greenroom.models.host_copy import to_device
from greenroom.models.token_history import TokenHistory


def needs_adjustment(p: SamplingParams) -> bool:
    return p.has_penalties or bool(p.logit_bias) or p.min_tokens > 0


@dataclass
class LogitsAdjustments:
    history: TokenHistory | None
    penalty_rows: torch.Tensor | None  # [P] rows of the batch with a penalty
    penalty_slots: torch.Tensor | None  # [P] their TokenHistory rows
    repetition: torch.Tensor | None  # [P, 1] float32; None when every row's is 1
    presence: torch.Tensor | None  # [P, 1]; None (with frequency) when every row's are 0
    frequency: torch.Tensor | None
    bias_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids)
    bias_values: torch.Tensor | None
    ban_index: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) set to -inf

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        num_outputs: list[int],
        history_slots: list[int],
        eos_token_ids: list[int],
        history: TokenHistory | None,
        device: torch.device | str,
    ) -> LogitsAdjustments | None:
        """``history_slots[i]``: the TokenHistory row of batch row ``i`` (-1: none)."""
        pen_rows, pen_slots, rep, pres, freq = [], [], [], [], []
        bias_rows, bias_ids, bias_vals = [], [], []
        ban_rows, ban_ids = [], []
        for row, p in enumerate(params):
            if p.has_penalties:
                pen_rows.append(row)
                pen_slots.append(history_slots[row])
                rep.append(p.repetition_penalty)
                pres.append(p.presence_penalty)
                freq.append(p.frequency_penalty)
            if p.logit_bias:
                bias_rows.extend([row] * len(p.logit_bias))
                bias_ids.extend(p.logit_bias.keys())
                bias_vals.extend(p.logit_bias.values())
            if num_outputs[row] < p.min_tokens:
                banned = set(p.stop_token_ids)
                if not p.ignore_eos:
                    banned.update(eos_token_ids)
                ban_rows.extend([row] * len(banned))
                ban_ids.extend(banned)
        if not pen_rows and not bias_rows and not ban_rows:
            return None

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        if pen_rows and (history is None or min(pen_slots) < 0):
            raise ValueError("a row with a penalty has no token history")
        any_rep = any(r != 1.0 for r in rep)
        any_count = any(p != 0.0 for p in pres) or any(f != 0.0 for f in freq)
        return cls(
            history=history if pen_rows else None,
            penalty_rows=put(pen_rows, torch.int64) if pen_rows else None,
            penalty_slots=put(pen_slots, torch.int64) if pen_rows else None,
            repetition=put(rep, torch.float32).unsqueeze(1) if any_rep else None,
            presence=put(pres, torch.float32).unsqueeze(1) if any_count else None,
            frequency=put(freq, torch.float32).unsqueeze(1) if any_count else None,
            bias_index=(put(bias_rows, torch.int64), put(bias_ids, torch.int64))
            if bias_rows
            else None,
            bias_values=put(bias_vals, torch.float32) if bias_rows else None,
            ban_index=(put(ban_rows, torch.int64), put(ban_ids, torch.int64)) if ban_rows else None,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted copy of float32 ``logits [B, V]`` (the input is left as it is)."""
        if self.penalty_rows is not None:
            assert self.history is not None and self.penalty_slots is not None
            rows = logits.index_select(0, self.penalty_rows)
            counts = self.history.output_counts.index_select(0, self.penalty_slots)
            generated = counts > 0
            if self.repetition is not None:  # some row's penalty is not 1
                seen = self.history.prompt_seen.index_select(0, self.penalty_slots)
                seen |= generated
                rep = self.repetition
                rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
            if self.frequency is not None:  # some row has a presence or frequency penalty
                rows -= self.frequency * counts
                rows -= self.presence * generated
            logits = logits.index_copy(0, self.penalty_rows, rows)
        if self.bias_index is not None:
            logits = logits.index_put(self.bias_index, self.bias_values, accumulate=True)
        if self.ban_index is not None:
            rows, _ = self.ban_index
            ninf = torch.full_like(rows, float("-inf"), dtype=logits.dtype)
            logits = logits.index_put(self.ban_index, ninf)
        return logits

    def record(self, token_ids: torch.Tensor) -> None:
        """Count the tokens just sampled (``[B]``, on the device) in the penalty rows' history."""
        if self.penalty_rows is not None:
            assert self.history is not None
            self.history.record(self.penalty_slots, token_ids.index_select(0, self.penalty_rows))
