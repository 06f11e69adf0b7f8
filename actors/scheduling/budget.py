"""Per-flow budgets: how many tokens and sequences one plan of a flow may carry."""

from __future__ import annotations

from dataclasses import dataclass

FLOW_NAMES = ("mixed", "context", "generation")


@dataclass(frozen=True, slots=True)
class FlowBudget:
    """The budget of one plan flow: ``mixed``, ``context`` or ``generation``."""

    name: str
    max_num_tokens: int
    max_batch_size: int
    # generation flow under adaptive SM-disaggregation routing: short prompts are admitted and
    # prefilled in its steps, beside the decodes, as in mixed mode
    takes_prompts: bool = False

    def __post_init__(self) -> None:
        if self.name not in FLOW_NAMES:
            raise ValueError(f"flow name {self.name!r} is invalid: must be one of {FLOW_NAMES}")
        if self.max_num_tokens < 1 or self.max_batch_size < 1:
            raise ValueError(
                f"flow {self.name!r}: max_num_tokens = {self.max_num_tokens} and "
                f"max_batch_size = {self.max_batch_size} must both be >= 1"
            )
        if self.takes_prompts and self.name != "generation":
            raise ValueError(f"flow {self.name!r}: takes_prompts is for the generation flow")

    @property
    def admits(self) -> bool:
        """Whether new requests enter through this flow."""
        return self.name != "generation" or self.takes_prompts

    @property
    def prefills(self) -> bool:
        return self.name != "generation" or self.takes_prompts

    @property
    def decodes(self) -> bool:
        return self.name != "context"


def check_flows(flows: list[FlowBudget]) -> dict[str, FlowBudget]:
    """Either one ``mixed`` flow, or a ``context`` and a ``generation`` flow."""
    names = sorted(f.name for f in flows)
    if names not in (["mixed"], ["context", "generation"]):
        raise ValueError(f"flows {names} are invalid: use ['mixed'] or ['context', 'generation']")
    return {f.name: f for f in flows}


class IterationBudget:
    """What is left of a flow's budget while one plan is being filled."""

    __slots__ = ("tokens", "seqs")

    def __init__(self, budget: FlowBudget) -> None:
        self.tokens = budget.max_num_tokens
        self.seqs = budget.max_batch_size

    @property
    def exhausted(self) -> bool:
        return self.tokens <= 0 or self.seqs <= 0

    def take(self, want: int) -> int:
        """Claim up to ``want`` tokens for one more sequence; 0 when nothing fits."""
        if self.exhausted or want <= 0:
            return 0
        got = min(want, self.tokens)
        self.tokens -= got
        self.seqs -= 1
        return got
