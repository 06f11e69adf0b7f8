"""Where the generation engine runs each step: its SM partition, or the whole GPU.

The partitions keep prefill off the SMs that decode uses, but a decode step on the generation
partition alone is slower than on every SM (measured on an H200, 8B shape: 6.2 vs 5.4 ms at
batch 12, 8.1 vs 6.1 ms at batch 50), and on a trace of short prompts the context engine is
idle most of the time. So while no context plan runs, the generation engine replays decode
and mixed-step graphs captured on a whole-GPU stream; while one runs, it replays those
captured on its partition's stream, and the two engines' kernels never share an SM. The
generation engine runs overlapped steps (each plan launched behind the one still on the GPU),
so a context plan that starts while whole-GPU steps are queued waits at most for those two
steps for SMs of its partition.

The context engine marks its plans in a :class:`ContextActivity`; the generation engine asks
a :class:`GenerationPlacement` before each step. Both engines live in one process, each on
its own thread; the flag is a plain counter (single writer, GIL-atomic reads).
"""

from __future__ import annotations

from typing import Any

PARTITION = "decode"  # the runner's decode graphs captured on the generation partition
WHOLE_GPU = "decode_whole"  # ... and those captured on a whole-GPU stream


class ContextActivity:
    """Whether the context engine is executing a plan now."""

    def __init__(self) -> None:
        self._running = 0
        self.plans = 0

    def begin(self) -> None:
        self._running += 1
        self.plans += 1

    def end(self) -> None:
        self._running -= 1

    @property
    def busy(self) -> bool:
        return self._running > 0


class GenerationPlacement:
    """Picks the generation engine's stream and graphs for its next step.

    ``whole_stream`` None (or no whole-GPU graphs) keeps every step on the partition. A switch
    between the two streams orders the new one after the old (``wait_stream``), so a step
    never overtakes the previous one's KV writes, nor (overlapped steps) the previous one's
    sampled tokens that it reads on the device: ``pick`` runs after the previous step was
    queued, so the wait covers all of it, its token read-back included.
    """

    def __init__(self, partition_stream: Any, whole_stream: Any, activity: ContextActivity) -> None:
        self.partition_stream = partition_stream
        self.whole_stream = whole_stream
        self.activity = activity
        self._last: Any = None
        self.steps = {PARTITION: 0, WHOLE_GPU: 0}

    def pick(self) -> tuple[Any, str]:
        """(stream, graph kind) for the next step."""
        if self.whole_stream is None or self.activity.busy:
            stream, kind = self.partition_stream, PARTITION
        else:
            stream, kind = self.whole_stream, WHOLE_GPU
        if self._last is not None and stream is not self._last:
            stream.wait_stream(self._last)
        self._last = stream
        self.steps[kind] += 1
        return stream, kind


__all__ = ["PARTITION", "WHOLE_GPU", "ContextActivity", "GenerationPlacement"]
