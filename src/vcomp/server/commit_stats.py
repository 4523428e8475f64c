"""Tallies the group committer keeps for /metrics and the dashboard.

Both are filled a whole committed group at a time on the committer's thread (one lock
per group, not per result) and read as consistent copies from the event loop:
a cumulative latency histogram, and results committed per time slot (jobs/s).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["COMMIT_BUCKETS", "HistogramSnapshot", "LatencyHistogram", "Throughput"]

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


class Throughput:
    """Results committed per ``slot_seconds``, over the last ``slots`` slots (a ring)."""

    def __init__(self, slot_seconds: float = 10.0, slots: int = 90) -> None:
        if slot_seconds <= 0 or slots < 1:
            raise ValueError("a throughput ring needs a positive slot length and a slot")
        self.slot_seconds = slot_seconds
        self._counts = [0] * slots
        self._slot_of = [-1] * slots  # which absolute slot each cell holds now
        self._lock = threading.Lock()

    def add(self, n: int, now: float) -> None:
        slot = int(now // self.slot_seconds)
        cell = slot % len(self._counts)
        with self._lock:
            if self._slot_of[cell] != slot:
                self._slot_of[cell], self._counts[cell] = slot, 0
            self._counts[cell] += n

    def series(self, now: float) -> list[int]:
        """Counts per slot, oldest first, ending with the slot holding ``now``."""
        newest = int(now // self.slot_seconds)
        size = len(self._counts)
        with self._lock:
            cells = list(zip(self._slot_of, self._counts, strict=True))
        out = []
        for slot in range(newest - size + 1, newest + 1):
            held, n = cells[slot % size]
            out.append(n if held == slot else 0)
        return out
