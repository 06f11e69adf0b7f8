"""What a client that falls behind has not taken yet: its replies, one delta per request.

Backpressure is not a disconnect: while a client's socket is full, the frontend keeps its
replies here and retries with a growing wait; a request's token deltas merge into one (they
are diffs), and a final message is never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from greenroom.bus.messages import TokenDelta

RETRY_S = (0.001, 0.05)  # first and longest wait before re-sending to a full client


@dataclass
class ClientOutbox:
    """Replies a full client has not taken yet; a request's deltas merge into one."""

    items: list = field(default_factory=list)
    open_delta: dict[tuple[str, int], int] = field(default_factory=dict)  # -> index in items
    retry_s: float = RETRY_S[0]
    scheduled: bool = False

    def add(self, item) -> None:
        if not isinstance(item, TokenDelta):
            self.items.append(item)
            return
        key = (item.request_id, item.index)
        i = self.open_delta.pop(key, None)
        if i is not None:
            item = merge_deltas(self.items[i], item)
            self.items[i] = item
        else:
            i = len(self.items)
            self.items.append(item)
        if item.finish_reason is None:
            self.open_delta[key] = i


def merge_deltas(a: TokenDelta, b: TokenDelta) -> TokenDelta:
    """One delta carrying ``a`` then ``b`` (of the same request and sample)."""
    logprobs = None
    if a.logprobs is not None or b.logprobs is not None:
        logprobs = [*(a.logprobs or []), *(b.logprobs or [])]
    text = None
    if a.text is not None or b.text is not None:
        text = (a.text or "") + (b.text or "")
    return msgspec.structs.replace(
        b, token_ids=[*a.token_ids, *b.token_ids], logprobs=logprobs, text=text
    )
