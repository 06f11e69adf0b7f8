"""The replay's progress bar: requests finished, failures, and an ETA that follows the schedule.

tqdm's own ETA divides the requests left by the completion rate so far, which early in a
replay reflects the arrival schedule, not the server (a 40 s replay showed 1:52:07). Here, while
requests remain to be sent the ETA is the time until the last send plus the mean latency so
far; once all are sent it is the requests in flight over the completion rate since then.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class ReplayProgress:
    def __init__(self, total: int, last_send_s: float, enabled: bool) -> None:
        self.total = total
        self.last_send_s = last_send_s
        self.start = time.perf_counter()
        self.done = self.failed = 0
        self.latency_sum = 0.0
        self.sent = 0
        self.all_sent_at: float | None = None
        self.done_at_all_sent = 0
        self.bar = tqdm(
            total=total,
            file=sys.stderr,
            disable=not enabled,
            unit="req",
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta_s(self) -> float | None:
        """Seconds until the last request finishes, or None while nothing tells."""
        now = self.elapsed()
        mean_latency = self.latency_sum / self.done if self.done else None
        if self.sent < self.total:
            return max(0.0, self.last_send_s - now) + (mean_latency or 0.0)
        if self.done >= self.total:
            return 0.0
        if self.all_sent_at is not None:
            since = now - self.all_sent_at
            finished = self.done - self.done_at_all_sent
            if finished and since > 0:
                return (self.total - self.done) / (finished / since)
        return mean_latency

    def on_sent(self) -> None:
        self.sent += 1
        if self.sent == self.total:
            self.all_sent_at, self.done_at_all_sent = self.elapsed(), self.done

    def on_finished(self, ok: bool, latency_s: float | None) -> None:
        self.done += 1
        self.failed += not ok
        if latency_s is not None:
            self.latency_sum += latency_s
        self.bar.update(1)
        self.refresh()

    def refresh(self) -> None:
        eta = self.eta_s()
        text = f"eta {'?' if eta is None else _clock(eta)}"
        if self.failed:
            text += f", failed {self.failed}"
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        self.refresh()
        self.bar.close()
