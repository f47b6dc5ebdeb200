"""Where a run's time goes: wall seconds per stage (forward, backward, statistics, factoring, writing).

Stages nest: a stage's seconds exclude the stages run inside it, so the parts add up to the whole.
Statistics (the hooks summing Grams and gradient moments) are timed by the hooks themselves and
taken out of the forward or backward that ran them.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager


class StageTimer:
    """``with timer.stage("forward"): …``; ``timer.record("statistics", seconds)`` from inside a stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner = [0.0]  # per open stage: seconds of the stages (and records) inside it

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed, inner = time.perf_counter() - start, self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            self._inner[-1] += elapsed

    def record(self, name: str, seconds: float) -> None:
        """Add ``seconds`` timed by the caller, inside the stage now open."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self._inner[-1] += seconds

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 1) for name, value in self.seconds.items()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
