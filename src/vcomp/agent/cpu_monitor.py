"""CPU accounting from /proc: machine-wide busy time and per-process CPU time.

Parsing is kept apart from reading so the parsers can be tested on fixed samples.
All times are CPU-seconds; machine figures are summed over every CPU, so a fraction
``busy / total`` is a share of the whole machine (1.0 = every core busy).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from vcomp.errors import ConfigError

PROC_STAT = "/proc/stat"
CPU_ONLINE = "/sys/devices/system/cpu/online"


def clock_ticks_per_second() -> int:
    """USER_HZ, the unit of /proc/stat and /proc/<pid>/stat times (100 on Linux)."""
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Cumulative machine CPU time, summed over all CPUs, in seconds."""

    busy: float
    total: float


@dataclass(frozen=True, slots=True)
class PidStat:
    """The fields of /proc/<pid>/stat that vcomp uses."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    cpu_seconds: float  # utime + stime of this process (all its threads)


def parse_proc_stat(text: str, ticks_per_second: int) -> CpuTimes:
    """Parse the aggregate ``cpu`` line of /proc/stat.

    Fields: user nice system idle iowait irq softirq steal guest guest_nice.
    guest time is already counted in user/nice, so it is not added again. Steal
    time belongs to other virtual machines, so it is neither busy nor available.
    """
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] != "cpu":
            continue
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError as exc:
            raise ValueError(f"malformed cpu line in /proc/stat: {line!r}") from exc
        if len(values) < 4:
            raise ValueError(f"short cpu line in /proc/stat: {line!r}")
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq = values[:7]
        busy = user + nice + system + irq + softirq
        total = busy + idle + iowait
        return CpuTimes(busy=busy / ticks_per_second, total=total / ticks_per_second)
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_pid_stat(text: str, ticks_per_second: int) -> PidStat:
    """Parse one /proc/<pid>/stat line.

    The command name (field 2) is in parentheses and may itself contain spaces
    and parentheses, so split at the last ``)``.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError("malformed /proc/<pid>/stat: no command name")
    rest = text[close_paren + 1 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    if len(rest) < 13:
        raise ValueError("malformed /proc/<pid>/stat: too few fields")
    try:
        pid = int(text[:open_paren])
        ppid, pgrp = int(rest[1]), int(rest[2])
        utime, stime = int(rest[11]), int(rest[12])
    except ValueError as exc:
        raise ValueError("malformed /proc/<pid>/stat: non-numeric field") from exc
    return PidStat(
        pid=pid,
        state=rest[0],
        ppid=ppid,
        pgrp=pgrp,
        cpu_seconds=(utime + stime) / ticks_per_second,
    )


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse a kernel CPU list such as ``0-3,8,10-11`` (as in Cpus_allowed_list)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError as exc:
            raise ValueError(f"malformed CPU list: {text!r}") from exc
        if first < 0 or last < first:
            raise ValueError(f"malformed CPU list: {text!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def busy_fraction(before: CpuTimes, after: CpuTimes) -> float:
    """Share of the machine that was busy between two samples (0.0 if no time passed)."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    return min(1.0, max(0.0, (after.busy - before.busy) / total))


def foreign_fraction(before: CpuTimes, after: CpuTimes, own_cpu_seconds: float) -> float:
    """Share of the machine used by everything except ``own_cpu_seconds``.

    Both counters tick at USER_HZ and are sampled at slightly different instants,
    so the difference can dip below zero; it is clamped to [0, 1].
    """
    total = after.total - before.total
    if total <= 0:
        return 0.0
    foreign = (after.busy - before.busy) - max(0.0, own_cpu_seconds)
    return min(1.0, max(0.0, foreign / total))


def read_machine_times() -> CpuTimes:
    """Read the cumulative machine CPU times from /proc/stat."""
    with open(PROC_STAT, encoding="ascii") as f:
        return parse_proc_stat(f.read(), clock_ticks_per_second())


def read_pid_stat(pid: int) -> PidStat | None:
    """Read /proc/<pid>/stat; ``None`` if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_pid_stat(text, clock_ticks_per_second())


def pids_cpu_seconds(pids: Iterable[int]) -> float:
    """Total CPU time of the given live processes (vanished ones count as 0)."""
    total = 0.0
    for pid in pids:
        stat = read_pid_stat(pid)
        if stat is not None:
            total += stat.cpu_seconds
    return total


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def _cpuset_paths() -> list[str]:
    """Candidate cpuset files for this process (cgroup v2, then v1)."""
    text = _read_text("/proc/self/cgroup") or ""
    paths: list[str] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths.append(f"/sys/fs/cgroup{cgroup.rstrip('/')}/cpuset.cpus.effective")
        elif "cpuset" in controllers.split(","):
            paths.append(f"/sys/fs/cgroup/cpuset{cgroup.rstrip('/')}/cpuset.effective_cpus")
    return paths


def read_allowed_cpus() -> frozenset[int]:
    """CPUs this process could be given: online CPUs within its cpuset.

    Unlike ``os.sched_getaffinity(0)`` this does not shrink after the agent moves
    itself off a dedicated core, so validating a core twice gives the same answer.
    """
    online_text = _read_text(CPU_ONLINE)
    allowed = parse_cpu_list(online_text) if online_text else frozenset(os.sched_getaffinity(0))
    for path in _cpuset_paths():
        text = _read_text(path)
        if text and text.strip():
            allowed &= parse_cpu_list(text)
            break
    if not allowed:
        raise ConfigError("no usable CPU found (online CPUs and cpuset do not intersect)")
    return allowed
