"""Which decoder layers each pipeline stage holds.

Stage k holds layers ``[first_layer, end_layer)``; stage 0 also the embedding, the last stage
the final norm, the LM head and sampling. The default split is even, the first
``num_layers % pp_size`` stages taking one layer more (so the last stage, which also runs the
LM head, has fewer); ``parallel.pp_layers`` gives every stage's count instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineStage:
    index: int
    size: int
    first_layer: int
    end_layer: int  # exclusive

    @classmethod
    def whole(cls, num_layers: int) -> PipelineStage:
        return cls(0, 1, 0, num_layers)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.first_layer

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)


def split_layers(num_layers: int, pp_size: int, pp_layers: Sequence[int] = ()) -> list[range]:
    """Each stage's layers; ValueError naming the numbers when they cannot be split so."""
    if pp_layers:
        if len(pp_layers) != pp_size:
            raise ValueError(
                f"parallel.pp_layers = {list(pp_layers)} gives {len(pp_layers)} stages but "
                f"pp_size = {pp_size}"
            )
        if any(n < 1 for n in pp_layers) or sum(pp_layers) != num_layers:
            raise ValueError(
                f"parallel.pp_layers = {list(pp_layers)} must be positive counts summing to the "
                f"model's {num_layers} layers"
            )
        counts = list(pp_layers)
    else:
        if num_layers < pp_size:
            raise ValueError(
                f"pp_size = {pp_size} is more stages than the model's {num_layers} layers"
            )
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (k < extra) for k in range(pp_size)]
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def stage_of(
    num_layers: int, index: int, size: int, pp_layers: Sequence[int] = ()
) -> PipelineStage:
    layers = split_layers(num_layers, size, pp_layers)[index]
    return PipelineStage(index, size, layers.start, layers.stop)
