"""Holding jobs still for the volunteer: a shared :class:`Hold` and a per-job :class:`HeldTree`.

The agent's preferences (pause, schedule, battery, user activity) set reasons on one
:class:`Hold`. Every running job's tree is stopped while any reason stands (cgroup
freezer, else SIGSTOP of the whole tree) and continued afterwards: no work is lost.
The execution mode's regulator drives the same tree through :class:`HeldTree`, which
stops the tree while either wants it stopped, so a throttle's resume cannot undo a
hold. Stopped wall time is counted once (the union of both) and is not charged to the
job's wall-clock or idle limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class _Tree(Protocol):
    def pids(self) -> list[int]: ...
    def suspend(self) -> None: ...
    def resume(self) -> None: ...
    def cpu_seconds(self) -> float: ...


class Hold:
    """Why jobs must stand still now: one reason per source (``pause``, ``battery``...)."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def held(self) -> bool:
        return bool(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def set(self, source: str, reason: str) -> None:
        was = self.held
        self._reasons[source] = reason
        if not was:
            self._notify()

    def clear(self, source: str) -> None:
        if self._reasons.pop(source, None) is not None and not self.held:
            self._notify()

    def subscribe(self, listener: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``listener(held)`` on each change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self) -> None:
        held = self.held
        for listener in list(self._listeners):
            listener(held)


class HeldTree:
    """A job tree stopped while its mode *or* the hold wants it stopped."""

    def __init__(self, tree: _Tree, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.tree = tree
        self._clock = clock
        self._by_mode = False
        self._by_hold = False
        self._stopped_at: float | None = None
        self._stopped_total = 0.0

    # The regulator's side (JobTreeLike).
    def pids(self) -> list[int]:
        return self.tree.pids()

    def cpu_seconds(self) -> float:
        return self.tree.cpu_seconds()

    def suspend(self) -> None:
        self._by_mode = True
        self._apply()

    def resume(self) -> None:
        self._by_mode = False
        self._apply()

    # The hold's side.
    def hold(self, held: bool) -> None:
        self._by_hold = held
        self._apply()

    def release(self) -> None:
        """The job is over: stop counting, and continue whatever is left so it can die."""
        self._by_mode = self._by_hold = False
        self._apply()

    @property
    def held(self) -> bool:
        return self._by_hold

    @property
    def stopped(self) -> bool:
        return self._stopped_at is not None

    @property
    def paused_seconds(self) -> float:
        """Wall time the tree stood still, for whichever reason, counted once."""
        if self._stopped_at is not None:
            return self._stopped_total + (self._clock() - self._stopped_at)
        return self._stopped_total

    def _apply(self) -> None:
        want = self._by_mode or self._by_hold
        if want and self._stopped_at is None:
            self.tree.suspend()
            self._stopped_at = self._clock()
        elif not want and self._stopped_at is not None:
            self._stopped_total += self._clock() - self._stopped_at
            self._stopped_at = None
            self.tree.resume()


class JobControl:
    """The agent's handle on one running job: the shared hold goes in, CPU and pause come out.

    The sandbox attaches the job's tree once the job process exists; until then (and
    after the job ends) :meth:`cpu_seconds` is the last value seen.
    """

    def __init__(
        self, hold: Hold | None = None, on_done: Callable[[float], None] | None = None
    ) -> None:
        self.hold = hold
        self.tree: HeldTree | None = None
        self.done = False  # the job's tree is gone; on_done had its final CPU
        self._on_done = on_done
        self._unsubscribe: Callable[[], None] | None = None
        self._last_cpu = 0.0

    def attach(self, tree: HeldTree) -> None:
        self.tree = tree
        if self.hold is not None:
            tree.hold(self.hold.held)
            self._unsubscribe = self.hold.subscribe(tree.hold)

    def detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.cpu_seconds()
        self.tree = None
        if not self.done:
            self.done = True
            if self._on_done is not None:
                self._on_done(self._last_cpu)

    def cpu_seconds(self) -> float:
        if self.tree is not None:
            self._last_cpu = max(self._last_cpu, self.tree.cpu_seconds())
        return self._last_cpu

    @property
    def stopped(self) -> bool:
        return self.tree is not None and self.tree.stopped
