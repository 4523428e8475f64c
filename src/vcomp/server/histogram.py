"""A cumulative latency histogram filled a batch at a time, read at scrape time.

The group committer's thread observes every result of a group at once (one lock per
group, not per result); ``/metrics`` reads a consistent copy from the event loop.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["COMMIT_BUCKETS", "HistogramSnapshot", "LatencyHistogram"]

#: Upper bounds in seconds: a group commit takes a fraction of a millisecond on tmpfs,
#: tens of ms behind an fsync, and seconds only when the store is in trouble.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]  # per bound, then +Inf (== count)
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class LatencyHistogram:
    def __init__(self, bounds: Sequence[float] = COMMIT_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be distinct and ascending")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, seconds: Iterable[float]) -> None:
        values = [max(0.0, s) for s in seconds]
        slots = [bisect.bisect_left(self._bounds, v) for v in values]
        with self._lock:
            for slot in slots:
                self._counts[slot] += 1
            self._sum += sum(values)

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(self._bounds, tuple(cumulative), total)
