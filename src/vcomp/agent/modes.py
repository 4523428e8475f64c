"""Execution modes: how a job shares the volunteer's machine (paper §5, §6).

- ``full``: normal priority, full speed (the paper's mode 1).
- ``throttle``: the job tree is stopped and continued so that, all its processes
  together, it uses at most N% of one core (the paper's mode 3, BOINC's
  ``cpu_usage_limit``). Unlike BOINC's fixed on/off timer, the off time is derived from
  the CPU the tree actually used (a token bucket over ``tree.cpu_seconds()``): a
  multi-process job cannot use N% per process, a job that blocks is not stopped for
  nothing, and tick rounding is repaid because the counters are cumulative.
- ``dedicated``: the job is pinned to core K and the agent keeps off K (the paper's
  proposed future work).
- ``background`` (default): nice 19, SCHED_IDLE and the lowest autogroup weight, and
  the tree is suspended while non-vcomp CPU use is above a threshold, with hysteresis
  (BOINC's ``suspend_cpu_usage``).

:func:`child_setup` runs in the job's child before exec (after setsid), :func:`agent_setup`
once in the agent, and a :class:`Regulator` supervises a running job tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

from vcomp.agent.cpu_monitor import (
    CpuTimes,
    foreign_fraction,
    read_allowed_cpus,
    read_machine_times,
)
from vcomp.errors import ConfigError

ModeKind = Literal["full", "throttle", "dedicated", "background"]
MODE_KINDS: tuple[ModeKind, ...] = ("full", "throttle", "dedicated", "background")
RegulatorState = Literal["running", "suspended"]

AUTOGROUP_PATH = "/proc/self/autogroup"

# A run slice shorter than this costs more in signals than it is worth.
MIN_RUN_SLICE = 0.005


class JobTreeLike(Protocol):
    """The part of the sandbox's job tree that a regulator drives."""

    def pids(self) -> list[int]: ...

    def suspend(self) -> None: ...

    def resume(self) -> None: ...

    def cpu_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class ExecutionMode:
    """A validated execution mode. Options that do not apply to ``kind`` keep defaults."""

    kind: ModeKind = "background"
    cpu_percent: int = 100
    core: int | None = None
    # Suspend only when the owner keeps most of the machine busy. SCHED_IDLE (with
    # the autogroup lowered) already keeps the job off CPU the owner wants, so a
    # BOINC-like 0.25 would only starve the job of idle cores (measured: 40% of
    # the idle core on 2 cores with one busy foreground thread, against >= 90%).
    busy_threshold: float = 0.75
    resume_threshold: float | None = None  # None: 0.6 * busy_threshold
    period: float = 0.1
    poll_interval: float = 0.5
    samples_to_suspend: int = 2
    samples_to_resume: int = 2

    def __post_init__(self) -> None:
        if self.kind not in MODE_KINDS:
            raise ConfigError(f"unknown mode {self.kind!r}; choose one of {', '.join(MODE_KINDS)}")
        if isinstance(self.cpu_percent, bool) or not isinstance(self.cpu_percent, int):
            raise ConfigError(f"cpu_percent must be an integer, got {self.cpu_percent!r}")
        if not 1 <= self.cpu_percent <= 100:
            raise ConfigError(f"cpu_percent must be between 1 and 100, got {self.cpu_percent}")
        if self.kind != "throttle" and self.cpu_percent != 100:
            raise ConfigError("cpu_percent only applies to throttle mode")
        if self.kind == "dedicated":
            if self.core is None:
                raise ConfigError("dedicated mode needs a core (--core K)")
            if isinstance(self.core, bool) or not isinstance(self.core, int) or self.core < 0:
                raise ConfigError(f"core must be a non-negative integer, got {self.core!r}")
        elif self.core is not None:
            raise ConfigError("core only applies to dedicated mode")
        _check_fraction("busy_threshold", self.busy_threshold)
        if self.resume_threshold is not None:
            _check_fraction("resume_threshold", self.resume_threshold)
            if self.resume_threshold > self.busy_threshold:
                raise ConfigError(
                    f"resume_threshold ({self.resume_threshold}) must not exceed "
                    f"busy_threshold ({self.busy_threshold})"
                )
        _check_interval("period", self.period, 0.01, 10.0)
        _check_interval("poll_interval", self.poll_interval, 0.05, 60.0)
        for name in ("samples_to_suspend", "samples_to_resume"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
                raise ConfigError(f"{name} must be an integer between 1 and 100, got {value!r}")

    @property
    def resume_below(self) -> float:
        """Foreign CPU share below which a suspended background job is resumed."""
        if self.resume_threshold is not None:
            return self.resume_threshold
        return 0.6 * self.busy_threshold


def _check_fraction(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a fraction of the machine in (0, 1], got {value}")


def _check_interval(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high} seconds, got {value}")


def parse_mode(text: str, **opts: Any) -> ExecutionMode:
    """Build a mode from its CLI/config name and options; ``None`` options are ignored.

    ``parse_mode("throttle", cpu_percent=30)``, ``parse_mode("dedicated", core=1)``.
    """
    kind = text.strip().lower()
    if kind not in MODE_KINDS:
        raise ConfigError(f"unknown mode {text!r}; choose one of {', '.join(MODE_KINDS)}")
    given = {k: v for k, v in opts.items() if v is not None}
    known = {f.name for f in fields(ExecutionMode)} - {"kind"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown mode option(s): {', '.join(unknown)}")
    if kind == "throttle" and "cpu_percent" not in given:
        raise ConfigError("throttle mode needs a CPU percentage (--cpu-percent N)")
    return ExecutionMode(kind=kind, **given)


def child_setup(mode: ExecutionMode) -> None:
    """Apply the mode to the current (child) process; call between fork and exec.

    No locks, no logging, no allocation beyond what the calls need. SCHED_IDLE is
    best effort: without it, nice 19 still applies.
    """
    if mode.kind == "dedicated" and mode.core is not None:
        os.sched_setaffinity(0, (mode.core,))
    elif mode.kind == "background":
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        _lower_autogroup()


def _lower_autogroup() -> None:
    """Give the job's session autogroup the lowest weight.

    With CONFIG_SCHED_AUTOGROUP each session is its own scheduling group, and nice and
    SCHED_IDLE only rank tasks *within* a group: a job that called setsid() would
    otherwise compete with the owner's whole session as an equal. Only lowering is
    asked for, which needs no privilege. Must run after setsid().
    """
    try:
        fd = os.open(AUTOGROUP_PATH, os.O_WRONLY)
    except OSError:
        return  # no autogroup support (or disabled): nothing to lower
    try:
        os.write(fd, b"19")
    except OSError:
        pass
    finally:
        os.close(fd)


def sched_idle_available() -> bool:
    """Whether this platform offers SCHED_IDLE (for ``vcomp-agent doctor``)."""
    return hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")


def agent_setup(mode: ExecutionMode, *, allowed: frozenset[int] | None = None) -> None:
    """Keep the agent's own threads off the dedicated core; a no-op for other modes.

    ``allowed`` defaults to the online CPUs within the agent's cpuset. Threads started
    later inherit the mask from the thread that starts them.
    """
    if mode.kind != "dedicated" or mode.core is None:
        return
    cpus = read_allowed_cpus() if allowed is None else allowed
    core = mode.core
    if core not in cpus:
        raise ConfigError(f"core {core} is not available; usable cores: {_cpu_list(cpus)}")
    if len(cpus) == 1:
        raise ConfigError(f"core {core} is the only usable core; it cannot be dedicated")
    current = frozenset(os.sched_getaffinity(0)) - {core}
    target = current if current else cpus - {core}
    # Sweep until no new thread appears, so one started during the sweep is caught.
    done: set[int] = set()
    for _ in range(5):
        tids = _thread_ids() - done
        if not tids:
            break
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, target)
        done |= tids


def _thread_ids() -> set[int]:
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return {0}


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True, slots=True)
class RegulatorEvent:
    """One suspend or resume decision, for tests and diagnostics."""

    at: float
    action: Literal["suspend", "resume"]
    reason: str
    foreign_share: float | None = None


class BusyHysteresis:
    """Background-mode decision: suspend after ``n_suspend`` consecutive samples above
    ``busy``, resume after ``n_resume`` consecutive samples below ``resume``.
    """

    def __init__(self, busy: float, resume: float, n_suspend: int, n_resume: int) -> None:
        self._busy, self._resume = busy, resume
        self._n_suspend, self._n_resume = n_suspend, n_resume
        self._streak = 0
        self.suspended = False

    def feed(self, foreign_share: float) -> bool:
        """Take one sample; return whether the job should be suspended now."""
        crossing = foreign_share < self._resume if self.suspended else foreign_share > self._busy
        self._streak = self._streak + 1 if crossing else 0
        needed = self._n_resume if self.suspended else self._n_suspend
        if self._streak >= needed:
            self.suspended = not self.suspended
            self._streak = 0
        return self.suspended


class CpuBudget:
    """Throttle accounting: a token bucket of CPU-seconds.

    Credit accrues at ``rate`` CPU-seconds per wall second, capped at one period's
    worth; the CPU the tree actually used is charged against it. A negative balance
    is paid back by suspending the tree for ``-balance / rate`` seconds.
    """

    def __init__(self, rate: float, period: float) -> None:
        self.rate = rate
        self._cap = rate * period
        self.balance = 0.0

    def charge(self, elapsed: float, used_cpu: float) -> float:
        """Account one interval; return how long to suspend (0.0 = keep running)."""
        self.balance = min(self._cap, self.balance + self.rate * max(0.0, elapsed))
        self.balance -= max(0.0, used_cpu)
        return -self.balance / self.rate if self.balance < 0 else 0.0


class Regulator:
    """Supervises one job tree for its lifetime according to an :class:`ExecutionMode`.

    ``supervise`` is cancelled by the sandbox when the job ends; it always leaves the
    tree resumed. ``paused_seconds`` is the wall time the tree spent suspended by the
    regulator (throttle off-time included); it is not charged to the wall-clock limit.
    """

    def __init__(
        self,
        mode: ExecutionMode,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_monitor: Callable[[], CpuTimes] | None = None,
        max_events: int = 256,
    ) -> None:
        self.mode = mode
        self._clock = clock
        self._read_machine = cpu_monitor if cpu_monitor is not None else read_machine_times
        self._state: RegulatorState = "running"
        self._paused_total = 0.0
        self._suspended_at = 0.0
        self.suspensions = 0
        self.last_foreign_share: float | None = None
        self.events: deque[RegulatorEvent] = deque(maxlen=max_events)

    @property
    def state(self) -> RegulatorState:
        return self._state

    @property
    def paused_seconds(self) -> float:
        """Total suspended wall time, including a suspension still in progress."""
        if self._state == "suspended":
            return self._paused_total + (self._clock() - self._suspended_at)
        return self._paused_total

    async def supervise(self, tree: JobTreeLike) -> None:
        try:
            if self.mode.kind == "throttle":
                await self._throttle(tree)
            elif self.mode.kind == "background":
                await self._background(tree)
            else:
                # full and dedicated: priority and affinity were set in child_setup.
                await asyncio.Event().wait()
        finally:
            if self._state == "suspended":
                self._resume(tree, "supervision ended")

    def _suspend(self, tree: JobTreeLike, reason: str, share: float | None = None) -> None:
        tree.suspend()
        self._state = "suspended"
        self._suspended_at = self._clock()
        self.suspensions += 1
        if self.mode.kind == "background":  # throttle would flood the log
            self.events.append(RegulatorEvent(self._suspended_at, "suspend", reason, share))

    def _resume(self, tree: JobTreeLike, reason: str, share: float | None = None) -> None:
        # Mark running first: if resume() raises, the caller still sees a true state.
        now = self._clock()
        self._paused_total += now - self._suspended_at
        self._state = "running"
        tree.resume()
        if self.mode.kind == "background" or reason == "supervision ended":
            self.events.append(RegulatorEvent(now, "resume", reason, share))

    async def _throttle(self, tree: JobTreeLike) -> None:
        budget = CpuBudget(self.mode.cpu_percent / 100.0, self.mode.period)
        run_slice = max(MIN_RUN_SLICE, budget.rate * self.mode.period)
        last_time, last_cpu = self._clock(), tree.cpu_seconds()
        while True:
            await asyncio.sleep(run_slice)
            now, cpu = self._clock(), tree.cpu_seconds()
            # Cumulative counters: tick rounding in one interval is repaid in the next.
            off = budget.charge(now - last_time, cpu - last_cpu)
            last_time, last_cpu = now, cpu  # a drop (a process exited) charges 0
            if off > 0:
                self._suspend(tree, "cpu budget spent")
                await asyncio.sleep(off)
                self._resume(tree, "cpu budget restored")

    async def _background(self, tree: JobTreeLike) -> None:
        mode = self.mode
        decide = BusyHysteresis(
            mode.busy_threshold, mode.resume_below, mode.samples_to_suspend, mode.samples_to_resume
        )
        before, job_before = self._read_machine(), tree.cpu_seconds()
        while True:
            await asyncio.sleep(mode.poll_interval)
            after, job_after = self._read_machine(), tree.cpu_seconds()
            share = foreign_fraction(before, after, job_after - job_before)
            before, job_before = after, job_after
            self.last_foreign_share = share
            want_suspended = decide.feed(share)
            if want_suspended and self._state == "running":
                self._suspend(
                    tree, f"machine busy ({share:.0%} > {mode.busy_threshold:.0%})", share
                )
            elif not want_suspended and self._state == "suspended":
                self._resume(tree, f"machine idle ({share:.0%} < {mode.resume_below:.0%})", share)
