"""The job's process tree: every process below the launcher, found through /proc.

The launcher is a child subreaper, so an orphan (a daemonised grandchild) is
re-parented to it, or to the job's pid-namespace init, and never leaves the tree.

With a job cgroup, CPU, memory and the final kill also come from the cgroup, which
sees every task, including children reaped without a wait, and suspending freezes
the cgroup where it can: a process stopped with SIGSTOP could be continued by a
sibling's SIGCONT, a frozen one cannot (without a freezer seccomp denies SIGCONT).
"""

from __future__ import annotations

import contextlib
import os
import signal

from vcomp.agent.sandbox.cgroup import JobCgroup

_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 = state is index 0)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    close = text.rfind(")")
    return text[close + 1 :].split() if close >= 0 else None


def _children(pid: int) -> list[int] | None:
    """Direct children of ``pid`` over all its threads; None if /proc lacks the file."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text is None:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # the kernel has no CONFIG_PROC_CHILDREN
            continue
        found.extend(int(c) for c in text.split())
    return found


def _children_by_scan() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _kib(line: str) -> int:
    parts = line.split()
    return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else 0


class JobTree:
    """Live view of one job's processes (the launcher itself excluded).

    Implements the interface the execution-mode regulator drives: ``pids``,
    ``suspend``, ``resume``, ``cpu_seconds``.
    """

    def __init__(self, launcher_pid: int, cgroup: JobCgroup | None = None) -> None:
        self.launcher_pid = launcher_pid
        self.cgroup = cgroup
        self.job_pid: int | None = None  # set once the launcher reports it
        self._cpu_high_water = 0.0
        self.peak_rss_bytes = 0
        self.peak_vm_bytes = 0
        self.peak_cgroup_bytes: int | None = None
        self._frozen = False

    def pids(self) -> list[int]:
        """Every live process of the job's tree, breadth first from the launcher."""
        found: list[int] = []
        frontier = [self.launcher_pid]
        scan: dict[int, list[int]] | None = None
        while frontier:
            nxt: list[int] = []
            for pid in frontier:
                kids = _children(pid) if scan is None else scan.get(pid, [])
                if kids is None:
                    scan = _children_by_scan()
                    kids = scan.get(pid, [])
                nxt.extend(kids)
            found.extend(nxt)
            frontier = nxt
        return found

    def signal_all(self, sig: int) -> int:
        """Send ``sig`` to every process, repeating until no new one appears."""
        done: set[int] = set()
        for _ in range(50):
            fresh = [p for p in self.pids() if p not in done]
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            done.update(fresh)
        return len(done)

    def suspend(self) -> None:
        if self.cgroup is not None and self.cgroup.freeze(True):
            self._frozen = True
            return
        self.signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        if self._frozen and self.cgroup is not None:
            self._frozen = not self.cgroup.freeze(False)
            return
        self.signal_all(signal.SIGCONT)

    def kill(self) -> None:
        if self.job_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.job_pid, signal.SIGKILL)  # as pid-namespace init: all die
        self.signal_all(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    def cpu_seconds(self) -> float:
        """CPU time of the tree so far: live processes plus the children they reaped,
        or the cgroup's count where that is higher (it also has the auto-reaped ones).

        Never decreases, although a process that exits unreaped drops out of the sum.
        """
        total = 0.0
        for pid in self.pids():
            fields = _stat_fields(pid)
            if fields is not None and len(fields) > 21:
                # utime, stime, cutime, cstime are fields 14-17 (indices 11-14 here).
                total += sum(int(v) for v in fields[11:15]) / _TICKS
        in_cgroup = self.cgroup.cpu_seconds() if self.cgroup is not None else None
        total = max(total, in_cgroup or 0.0)
        self._cpu_high_water = max(self._cpu_high_water, total)
        return self._cpu_high_water

    def sample_memory(self) -> None:
        """Update the peaks from each process's high-water marks (VmHWM, VmPeak), and
        the whole tree's from the cgroup.
        """
        if self.cgroup is not None:
            peak = self.cgroup.peak_memory()
            if peak is not None:
                self.peak_cgroup_bytes = max(self.peak_cgroup_bytes or 0, peak)
        for pid in self.pids():
            text = _read(f"/proc/{pid}/status")
            if text is None:
                continue
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_bytes = max(self.peak_rss_bytes, _kib(line))
                elif line.startswith("VmPeak:"):
                    self.peak_vm_bytes = max(self.peak_vm_bytes, _kib(line))

    @property
    def peak_memory_bytes(self) -> int:
        """The tree's peak where a cgroup measured it, else the largest process's."""
        if self.peak_cgroup_bytes is not None:
            return self.peak_cgroup_bytes
        return self.peak_rss_bytes

    def out_of_memory(self, *, killed: bool = False) -> bool:
        """Did the kernel kill a process at the cgroup's memory limit?"""
        return self.cgroup is not None and self.cgroup.out_of_memory(killed=killed)
