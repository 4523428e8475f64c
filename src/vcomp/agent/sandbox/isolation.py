"""Child-side isolation steps: namespaces, mounts, identity, limits, descriptors, signals.

Each step raises OSError with the kernel's reason; the launcher turns that into a
reported protection status. Nothing here runs in the agent process itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import signal
from dataclasses import dataclass

from vcomp.agent.sandbox import rootfs
from vcomp.agent.sandbox.libc import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    LAST_CAPABILITY,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    PR_CAPBSET_DROP,
    mount,
    prctl,
    sethostname,
    unshare,
)
from vcomp.agent.sandbox.policy import JobLimits

NAMESPACES: tuple[tuple[str, int], ...] = (
    ("mount_namespace", CLONE_NEWNS),
    ("pid_namespace", CLONE_NEWPID),
    ("net_namespace", CLONE_NEWNET),
    ("ipc_namespace", CLONE_NEWIPC),
    ("uts_namespace", CLONE_NEWUTS),
    # Entered after the launcher joined the job's cgroup, so that cgroup is the job's
    # "/": /proc/self/cgroup no longer names the host's cgroup path or the agent's pid.
    ("cgroup_namespace", CLONE_NEWCGROUP),
)
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
HIDDEN_TMPFS = "size=64k,nr_inodes=64,mode=755"


def unshare_namespaces(flags: list[tuple[str, int]]) -> dict[str, str | None]:
    """Enter new namespaces; name -> None if entered, else the reason it failed.

    All at once first (a new user namespace then owns the others), else one by one.
    """
    combined = 0
    for _, flag in flags:
        combined |= flag
    try:
        unshare(combined)
        return {name: None for name, _ in flags}
    except OSError:
        pass
    result: dict[str, str | None] = {}
    for name, flag in flags:
        try:
            unshare(flag)
            result[name] = None
        except OSError as exc:
            result[name] = f"unshare: {exc.strerror}"
    return result


def write_id_maps(inner_uid: int, outer_uid: int, inner_gid: int, outer_gid: int) -> None:
    """Map one uid and one gid into the user namespace this process just created."""
    with contextlib.suppress(FileNotFoundError):
        _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def drop_identity(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


@dataclass(frozen=True, slots=True)
class MountResult:
    proc_mounted: bool
    hidden: tuple[str, ...]
    missing: tuple[str, ...]
    root: rootfs.RootResult | None = None  # the minimal root, when it was built
    root_error: str | None = None  # why it was not


def setup_mounts(
    *,
    new_proc: bool,
    hidden: list[str],
    reexpose: list[str],
    hostname: str | None,
    root_binds: list[str] | None = None,
    owner: tuple[int, int] = (0, 0),
) -> MountResult:
    """Make mounts private, then build the minimal root (with ``root_binds``, the
    non-system directories the job reads; ``owner`` is the job's uid and gid).

    Where the minimal root cannot be built (or is not wanted), fall back to the host's
    root with a fresh /proc and ``hidden`` covered by empty tmpfs; ``reexpose`` paths
    under a hidden directory are bind-mounted back, so the interpreter under e.g. /root
    stays reachable while the rest of /root is gone.
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if hostname is not None:
        sethostname(hostname)
    root_error = "not requested"
    if root_binds is not None:
        try:
            root = rootfs.build_root(
                binds=root_binds, new_proc=new_proc, uid=owner[0], gid=owner[1]
            )
            return MountResult(new_proc, (), (), root)
        except OSError as exc:
            root_error = f"{exc.strerror or exc}"
    if new_proc:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    done: list[str] = []
    missing: list[str] = []
    for path in sorted(hidden, key=lambda p: p.count("/")):
        if not os.path.lexists(path) or os.path.islink(path):
            missing.append(path)
            continue
        if os.path.isdir(path):
            _cover_dir(path, [r for r in reexpose if _is_under(r, path)])
        else:
            mount("/dev/null", path, None, MS_BIND, None)
        done.append(path)
    return MountResult(new_proc, tuple(done), tuple(missing), None, root_error)


def _is_under(path: str, parent: str) -> bool:
    return path != parent and path.startswith(parent.rstrip("/") + "/")


def _cover_dir(path: str, keep: list[str]) -> None:
    flags = MS_NOSUID | MS_NODEV
    if not keep:  # one mount instead of mount + remount
        mount("tmpfs", path, "tmpfs", flags | MS_RDONLY, HIDDEN_TMPFS)
        return
    fds = []
    for inner in keep:
        with contextlib.suppress(OSError):
            fds.append((inner, os.open(inner, os.O_PATH | os.O_CLOEXEC)))
    try:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, HIDDEN_TMPFS)
        for inner, fd in fds:
            os.makedirs(inner, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", inner, None, MS_BIND | MS_REC, None)
        mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    finally:
        for _, fd in fds:
            os.close(fd)


def hide_argv(title: bytes) -> None:
    """Overwrite this process's argv and environment areas, which ``/proc/<pid>/cmdline``
    and ``environ`` read: the init is a fork of the agent, so they hold the agent's.
    Python keeps its own copies; nothing here reads the originals again.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # Fields 48-51 of stat(5); the split starts at field 3.
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    if not (0 < arg_start < arg_end and 0 < env_start <= env_end):
        raise OSError(22, "no argument area in /proc/self/stat")
    ctypes.memset(env_start, 0, env_end - env_start)
    ctypes.memset(arg_start, 0, arg_end - arg_start)
    ctypes.memmove(arg_start, title, min(len(title), arg_end - arg_start - 1))


def set_rlimits(limits: JobLimits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))


def drop_capabilities() -> int:
    """Empty the bounding and ambient sets; returns how many capabilities were dropped."""
    with contextlib.suppress(OSError):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    dropped = 0
    for cap in range(LAST_CAPABILITY + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
            dropped += 1
        except OSError:
            pass
    return dropped


def arrange_fds(targets: dict[int, int], extras: list[int]) -> list[int]:
    """Install ``targets`` (wanted fd -> current fd), keep ``extras`` close-on-exec,
    close everything else. Returns the new numbers of ``extras``.
    """
    high = {want: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 32) for want, fd in targets.items()}
    high_extras = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 32) for fd in extras]
    os.closerange(0, 32)
    for want, fd in high.items():
        os.dup2(fd, want, inheritable=True)
    low_extras = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 6) for fd in high_extras]
    first_free = max([5, *targets, *low_extras]) + 1
    os.closerange(first_free, 0x7FFFFFFF)
    return low_extras


def reset_signals() -> None:
    """Undo what the agent's interpreter did to signals (SIGPIPE ignored, handlers, mask)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            if signal.getsignal(sig) is not signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


NEW_USER = CLONE_NEWUSER


def join_cgroup(procs_file: str) -> None:
    """Move this process (and so everything it forks later) into a cgroup."""
    _write(procs_file, str(os.getpid()))


IPC_SHM_SYSCTLS = ("shmmni", "shmall", "shmmax", "msgmni", "msgmnb")


def cap_ipc_shm() -> None:
    """No SysV shared memory or message queues in this process's (new) IPC namespace:
    the limits are per namespace, and a segment or a queued message outlives its
    creator unmapped, out of RLIMIT_AS's sight.
    """
    for name in IPC_SHM_SYSCTLS:
        _write(f"/proc/sys/kernel/{name}", "0")
