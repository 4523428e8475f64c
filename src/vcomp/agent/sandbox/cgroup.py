"""One cgroup per job: memory, process count and CPU of the whole tree, in one place.

RLIMIT_AS bounds each process's address space, but not the sum over processes, nor
shared memory that is never mapped (memfds, SysV segments, tmpfs pages). A memory
cgroup charges every page the job's tree touches, whoever holds it; ``cpuacct`` (v1)
or ``cpu.stat`` (v2) counts the CPU of children that were reaped without a wait.

The job's cgroup is created below the agent's own cgroup (one per controller on v1),
named ``vcomp-job-<agent pid>-<n>``; the launcher moves itself in before it forks the
job's init, and the directory is removed once the tree is dead. cgroup v2 is used
where the agent's cgroup can delegate ``memory`` and ``pids`` to children, else v1
(``memory`` and ``cpuacct``, plus ``pids`` and ``freezer`` where mounted). The
execution modes suspend the job by freezing its cgroup (v1 ``freezer.state``, v2
``cgroup.freeze``), which no signal from the job can undo.

Every failure is an OSError (from the kernel) or a reason string; nothing here raises
anything else into the agent.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from dataclasses import dataclass

V1_REQUIRED = ("memory", "cpuacct")
# The freezer suspends the tree as one; without it the throttle stops it with SIGSTOP.
V1_OPTIONAL = ("pids", "freezer")
V2_REQUIRED = ("memory", "pids")
# The launcher and the job's init are in the cgroup too, beside the job's processes.
PIDS_OVERHEAD = 4
REMOVE_TRIES = 100  # x 10 ms: a killed task leaves its cgroup shortly after SIGKILL
JOB_PREFIX = "vcomp-job-"
AGENT_LEAF = "vcomp-agent-"
# One count per process: several sandboxes (workers) of one agent share its name space.
_SERIAL = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Mount:
    version: int  # 1 or 2
    root: str  # the mount's root inside the hierarchy
    path: str  # where it is mounted
    controllers: frozenset[str]  # v1: from the super options; v2: empty here


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as controller -> path; the v2 entry is under ``""``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0" and parts[1] == "":
            found[""] = parts[2]
        for name in parts[1].split(","):
            if name and not name.startswith("name="):
                found[name] = parts[2]
    return found


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in ``/proc/<pid>/mountinfo``."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        root, path = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(Mount(2, root, path, frozenset()))
        elif fstype == "cgroup":
            mounts.append(Mount(1, root, path, frozenset(options)))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _below(mount: Mount, cgroup_path: str) -> str | None:
    """The directory of ``cgroup_path`` under ``mount``, if the mount shows it."""
    root = mount.root.rstrip("/")
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    rest = cgroup_path[len(root) :].lstrip("/")
    return os.path.join(mount.path, rest) if rest else mount.path


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.events, cpu.stat, memory.oom_control)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


class CgroupHost:
    """Where this agent's job cgroups go: per controller, the agent's own directory."""

    def __init__(self, version: int, parents: dict[str, str]) -> None:
        self.version = version
        self.parents = parents  # v2: one entry, "" -> the directory
        self.leftovers: list[JobCgroup] = []  # removal deferred: a task lingered

    def describe(self) -> str:
        if self.version == 2:
            return "v2: memory,pids,cpu,freeze"
        return "v1: " + ",".join(c for c in (*V1_REQUIRED, *V1_OPTIONAL) if c in self.parents)

    def new_job(self) -> JobCgroup:
        """Create an empty job cgroup (OSError on failure, nothing left behind)."""
        self.retry_leftovers()
        name = f"{JOB_PREFIX}{os.getpid()}-{next(_SERIAL)}"
        made: dict[str, str] = {}
        try:
            for controller, parent in self.parents.items():
                path = os.path.join(parent, name)
                os.mkdir(path, 0o755)
                made[controller] = path
        except OSError:
            for path in made.values():
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        return JobCgroup(self.version, made)

    def retry_leftovers(self) -> None:
        self.leftovers = [cg for cg in self.leftovers if cg.remove() is not None]

    def sweep_stale(self) -> None:
        """Remove job cgroups of agents that are gone (a crash left them behind)."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                for entry in os.scandir(parent):
                    if _stale(entry.name):
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)


def _stale(name: str) -> bool:
    """A job cgroup (or v2 agent leaf) whose agent, the pid in its name, is gone."""
    prefix = next((p for p in (JOB_PREFIX, AGENT_LEAF) if name.startswith(p)), None)
    owner = name[len(prefix) :].split("-")[0] if prefix is not None else ""
    return owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobCgroup:
    """One job's cgroup: limits, accounting, kill, removal."""

    def __init__(self, version: int, dirs: dict[str, str]) -> None:
        self.version = version
        self.dirs = dirs  # controller -> directory; v2: "" -> the directory
        self.cpu_baseline = 0.0

    def _dir(self, controller: str) -> str | None:
        return self.dirs.get("" if self.version == 2 else controller)

    def procs_files(self) -> tuple[str, ...]:
        """What the launcher writes its pid into to join (every hierarchy)."""
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs.values())

    def set_limits(self, memory_bytes: int, max_processes: int) -> None:
        """Bound the tree's memory (RAM and swap) and task count. OSError on failure."""
        pids = str(max_processes + PIDS_OVERHEAD)
        mem, pid_dir = self._dir("memory"), self._dir("pids")
        if self.version == 2 and mem is not None:
            _write(os.path.join(mem, "memory.max"), str(memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting
                _write(os.path.join(mem, "memory.swap.max"), "0")
            with contextlib.suppress(FileNotFoundError):  # one OOM kill takes the tree
                _write(os.path.join(mem, "memory.oom.group"), "1")
        elif mem is not None:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting
                _write(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory_bytes))
        if pid_dir is not None:
            _write(os.path.join(pid_dir, "pids.max"), pids)
        self.cpu_baseline = self.cpu_total() or 0.0

    def cpu_total(self) -> float | None:
        """CPU seconds of every task that ever ran here, reaped or not."""
        try:
            if self.version == 2:
                usec = _keyed(_read(os.path.join(self.dirs[""], "cpu.stat"))).get("usage_usec")
                return None if usec is None else usec / 1e6
            acct = self._dir("cpuacct")
            return None if acct is None else int(_read(os.path.join(acct, "cpuacct.usage"))) / 1e9
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        """CPU since the limits were set (a prepared launcher's setup does not count)."""
        total = self.cpu_total()
        return None if total is None else max(0.0, total - self.cpu_baseline)

    def peak_memory(self) -> int | None:
        mem = self._dir("memory")
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return None if mem is None else int(_read(os.path.join(mem, name)))
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        """Processes the kernel killed for want of memory here; None if not counted."""
        mem = self._dir("memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            return None if mem is None else _keyed(_read(os.path.join(mem, name))).get("oom_kill")
        except OSError:
            return None

    def limit_hits(self) -> int:
        """How often an allocation met the limit (v1 failcnt, v2 ``max`` events)."""
        mem = self._dir("memory")
        try:
            if mem is None:
                return 0
            if self.version == 2:
                return _keyed(_read(os.path.join(mem, "memory.events"))).get("max", 0)
            return int(_read(os.path.join(mem, "memory.failcnt")))
        except (OSError, ValueError):
            return 0

    def out_of_memory(self, *, killed: bool) -> bool:
        """Did the kernel kill a task for memory? Without an oom_kill count, a SIGKILL
        (``killed``) after the limit was hit is taken as one.
        """
        kills = self.oom_kills()
        if kills is not None:
            return kills > 0
        return killed and self.limit_hits() > 0

    @property
    def can_freeze(self) -> bool:
        """Whether every task can be suspended at once (v1 freezer, v2 cgroup.freeze)."""
        if self.version == 2:
            return "" in self.dirs and os.path.exists(os.path.join(self.dirs[""], "cgroup.freeze"))
        return "freezer" in self.dirs

    def freeze(self, frozen: bool) -> bool:
        """Freeze (or thaw) every task, new ones included; False if this cgroup cannot."""
        try:
            if self.version == 2:
                _write(os.path.join(self.dirs[""], "cgroup.freeze"), "1" if frozen else "0")
            elif "freezer" in self.dirs:
                state = "FROZEN" if frozen else "THAWED"
                _write(os.path.join(self.dirs["freezer"], "freezer.state"), state)
            else:
                return False
        except (OSError, KeyError):
            return False
        return True

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.dirs.values():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in _read(os.path.join(path, "cgroup.procs")).split())
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL every task; v2 does it atomically, v1 until none is left to find."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.dirs[""], "cgroup.kill"), "1")
                return
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            # A frozen task (v1) dies only once thawed; the kills above are pending.
            self.freeze(False)

    def remove(self) -> str | None:
        """Kill what is left and remove the directories; a reason if one remains."""
        reason = None
        for attempt in range(REMOVE_TRIES):
            self.kill()
            reason = self._rmdir_all()
            if reason is None:
                return None
            time.sleep(0.01 if attempt else 0.001)
        return reason

    def _rmdir_all(self) -> str | None:
        reason = None
        for controller, path in list(self.dirs.items()):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                reason = f"rmdir {path}: {exc.strerror}"
                continue
            del self.dirs[controller]
        return reason


# --- finding the agent's cgroups --------------------------------------------------------


def find_host(
    proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> CgroupHost | str:
    """The cgroup setup for job cgroups on this host, or the reason there is none."""
    try:
        own = parse_proc_cgroup(_read(proc_cgroup))
        mounts = parse_mountinfo(_read(mountinfo))
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror}"
    v2 = _v2_host(own, mounts)
    if isinstance(v2, CgroupHost):
        return v2
    v1 = _v1_host(own, mounts)
    if isinstance(v1, CgroupHost):
        return v1
    return f"{v2}; {v1}"


def _v1_host(own: dict[str, str], mounts: list[Mount]) -> CgroupHost | str:
    parents: dict[str, str] = {}
    for controller in (*V1_REQUIRED, *V1_OPTIONAL):
        path = own.get(controller)
        for mount in mounts:
            if mount.version == 1 and controller in mount.controllers and path is not None:
                where = _below(mount, path)
                if where is not None and os.access(where, os.W_OK):
                    parents[controller] = where
                    break
        if controller not in parents and controller in V1_REQUIRED:
            if path is None:
                return f"v1: no {controller} controller"
            return f"v1: no writable {controller} hierarchy for {path}"
    return CgroupHost(1, parents)


def _v2_host(own: dict[str, str], mounts: list[Mount]) -> CgroupHost | str:
    path = own.get("")
    mount = next((m for m in mounts if m.version == 2), None)
    if path is None or mount is None:
        return "v2: not mounted"
    where = _below(mount, path)
    if where is None:
        return "v2: the agent's cgroup is outside the mount"
    # After moving itself into a leaf (below), the agent's cgroup is that leaf's parent.
    if os.path.basename(where) == f"{AGENT_LEAF}{os.getpid()}":
        where = os.path.dirname(where)
    try:
        available = _read(os.path.join(where, "cgroup.controllers")).split()
    except OSError as exc:
        return f"v2: {exc.strerror}"
    missing = [c for c in V2_REQUIRED if c not in available]
    if missing:
        return f"v2: controllers {','.join(missing)} not delegated"
    if not os.access(where, os.W_OK):
        return f"v2: {where} is not writable"
    reason = _delegate(where)
    return CgroupHost(2, {"": where}) if reason is None else f"v2: {reason}"


def _delegate(where: str) -> str | None:
    """Enable memory and pids for children. The "no internal processes" rule forbids
    that while the agent sits in ``where`` itself, so it moves into a leaf first.
    """
    control = os.path.join(where, "cgroup.subtree_control")
    try:
        enabled = _read(control).split()
        if all(c in enabled for c in V2_REQUIRED):
            return None
        leaf = os.path.join(where, f"{AGENT_LEAF}{os.getpid()}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755)
        if str(os.getpid()) in _read(os.path.join(where, "cgroup.procs")).split():
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        extra = " +cpu" if "cpu" in _read(os.path.join(where, "cgroup.controllers")).split() else ""
        _write(control, "+memory +pids" + extra)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return "other processes share the agent's cgroup; give the agent its own"
        return f"cannot delegate controllers: {exc.strerror or exc}"
    return None
