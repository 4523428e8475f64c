"""The forked processes between the agent and the job.

1. The *launcher* (forked from the agent) starts a session, becomes a child
   subreaper, enters the new namespaces and forks the init.
2. The *init* (pid 1 of the job's pid namespace) overwrites the agent's argv it
   inherited, pivots into the minimal root, mounts the job's tmpfs work dir, drops its
   identity, applies Landlock, no_new_privs and seccomp to itself, forks the job and
   reaps until the job ends; its exit then takes every other process of the namespace
   along, and with the last of them the mount namespace and the work dir go.
3. The *job process* sets its rlimits and execution mode and execs the job's code.

A *prepared* launcher does steps 1 and the job-independent half of 2 (up to the
minimal root) ahead of time, then waits on a control socket for the JobSpec (JSON plus
descriptors, SCM_RIGHTS). The work dir's size comes with the job, and mounting it needs
the privilege that dropping the identity gives up, so both happen after the job arrives.

None of them returns into the agent's code: every path ends in ``os._exit``. They
talk to the agent through two pipes, one short line per item.

Setup pipe (close-on-exec; EOF once the job process has exec'd)::

    P <name> <active|unavailable|failed> <reason>      a protection
    F <stage> <message>                                 setup failed, the job will not run
    D                                                   dry run finished (probe)

Status pipe::

    J <pid>                                             the init started (launcher)
    X <wait status> <user s> <sys s> <maxrss KiB>       the job process ended (init)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from vcomp.agent.sandbox import isolation, landlock, rootfs
from vcomp.agent.sandbox.libc import (
    CLONE_NEWUSER,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    install_seccomp_program,
    prctl,
    set_no_new_privs,
    set_pdeathsig,
    unshare,
)
from vcomp.agent.sandbox.policy import JobLimits

EXIT_SETUP_FAILED = 127
HOSTNAME = "vcomp-job"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """The per-job part: what to exec, with which limits and descriptors (agent's numbers)."""

    argv: tuple[str, ...]
    exec_path: str
    env: dict[str, str]
    limits: JobLimits
    job_in: int
    job_out: int
    job_stdout: int
    job_stderr: int
    workdir_fd: int
    workdir_path: str
    payload_fd: int | None = None  # python: becomes fd 5 in the job
    code_fd: int | None = None  # exec: the memfd executed through /proc/self/fd

    def fds(self) -> list[int]:
        fds = [self.job_in, self.job_out, self.job_stdout, self.job_stderr, self.workdir_fd]
        return fds + [fd for fd in (self.payload_fd, self.code_fd) if fd is not None]

    def to_message(self) -> tuple[bytes, list[int]]:
        """Encode for a prepared launcher: JSON plus the descriptors, in a fixed order."""
        header = {
            "argv": list(self.argv),
            "exec_path": self.exec_path,
            "env": self.env,
            "limits": {f: getattr(self.limits, f) for f in self.limits.__dataclass_fields__},
            "workdir_path": self.workdir_path,
            "payload": self.payload_fd is not None,
            "code": self.code_fd is not None,
        }
        return json.dumps(header).encode(), self.fds()

    @classmethod
    def from_message(cls, data: bytes, fds: list[int]) -> JobSpec:
        header = json.loads(data)
        extra = fds[5] if len(fds) > 5 else None
        return cls(
            argv=tuple(header["argv"]),
            exec_path=header["exec_path"],
            env=dict(header["env"]),
            limits=JobLimits(**header["limits"]),
            job_in=fds[0],
            job_out=fds[1],
            job_stdout=fds[2],
            job_stderr=fds[3],
            workdir_fd=fds[4],
            workdir_path=header["workdir_path"],
            payload_fd=extra if header["payload"] else None,
            code_fd=extra if header["code"] else None,
        )


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """The per-sandbox part: isolation settings and the pipes back to the agent."""

    setup_w: int
    status_w: int
    # identity
    privileged: bool  # the agent is root: namespaces first, then drop to job_uid
    job_uid: int
    job_gid: int
    # isolation wishes
    namespaces: bool
    hidden_paths: tuple[str, ...]
    reexpose_paths: tuple[str, ...]
    root_binds: tuple[str, ...]  # non-system directories the minimal root holds (read-only)
    landlock_abi: int
    landlock_reason: str
    read_paths: tuple[str, ...]
    rw_files: tuple[str, ...]
    seccomp_program: bytes | None
    seccomp_builder: str
    seccomp_reason: str
    child_setup: Callable[[], None] | None = None
    dry_run: bool = False
    # A prepared launcher gets its JobSpec over this socket instead of at fork time.
    control_fd: int | None = None
    agent_pid: int = field(default_factory=os.getpid)
    # The job's cgroup (its cgroup.procs files), joined before anything is forked.
    cgroup_procs: tuple[str, ...] = ()
    # Without a cgroup: no SysV shared memory in the job's IPC namespace.
    cap_ipc_shm: bool = False


MAX_SPEC_BYTES = 1 << 20


class _Reporter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def protection(self, name: str, status: str, reason: str = "") -> None:
        self._line(f"P {name} {status} {reason}")

    def done(self) -> None:
        self._line("D")

    def fail(self, stage: str, message: str) -> None:
        self._line(f"F {stage} {message}")

    def _line(self, text: str) -> None:
        data = (" ".join(text.split()) + "\n").encode("utf-8", "replace")[:4000]
        with contextlib.suppress(OSError):
            os.write(self.fd, data)


def launcher_main(plan: LaunchPlan, job: JobSpec | None) -> NoReturn:
    """Body of the launcher process (the agent's forked child). Without ``job`` it
    prepares everything it can, then waits for the JobSpec on ``plan.control_fd``.
    """
    report = _Reporter(plan.setup_w)
    status = EXIT_SETUP_FAILED
    try:
        status = _launcher(plan, job, report)
    except BaseException as exc:  # must never unwind into the agent's code
        report.fail("launcher", f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(status)


def _launcher(plan: LaunchPlan, job: JobSpec | None, report: _Reporter) -> int:
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    for procs in plan.cgroup_procs:
        try:
            isolation.join_cgroup(procs)
        except OSError as exc:
            report.fail("cgroup", f"cannot join {procs}: {exc.strerror or exc}")
            return EXIT_SETUP_FAILED
    keep = [plan.setup_w, plan.status_w]
    keep += job.fds() if job is not None else []
    keep += [plan.control_fd] if plan.control_fd is not None else []
    _close_all_but(keep)

    pid_ns = mount_ns = False
    if plan.namespaces:
        wanted = list(isolation.NAMESPACES)
        if not plan.privileged:
            wanted.insert(0, ("user_namespace", CLONE_NEWUSER))
        entered = isolation.unshare_namespaces(wanted)
        if not plan.privileged:
            if entered.get("user_namespace") is None:
                uid, gid = os.getuid(), os.getgid()
                isolation.write_id_maps(uid, uid, gid, gid)
            else:
                # Without a user namespace an unprivileged process gets no other one.
                entered = {name: entered["user_namespace"] for name, _ in wanted}
        for name, reason in entered.items():
            if reason is None:
                report.protection(name, "active")
            else:
                report.protection(name, "unavailable", reason)
        pid_ns = entered.get("pid_namespace") is None
        mount_ns = entered.get("mount_namespace") is None
        if plan.cap_ipc_shm:
            _cap_ipc_shm(report, entered.get("ipc_namespace"))
    else:
        for name in ("user_namespace", *(n for n, _ in isolation.NAMESPACES)):
            report.protection(name, "unavailable", "disabled by configuration")

    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != plan.agent_pid:
        return EXIT_SETUP_FAILED  # the agent is already gone
    init_pid = os.fork()
    if init_pid == 0:
        init_main(plan, job, report, pid_ns=pid_ns, mount_ns=mount_ns)
    _write_line(plan.status_w, f"J {init_pid}")
    for fd in keep:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Reap the init and every orphan adopted as subreaper, until none is left.
    while True:
        try:
            os.wait4(-1, 0)
        except ChildProcessError:
            return 0


def _cap_ipc_shm(report: _Reporter, not_entered: str | None) -> None:
    if not_entered is not None:
        report.protection("ipc_shm_limits", "unavailable", f"no IPC namespace: {not_entered}")
        return
    try:
        isolation.cap_ipc_shm()
        report.protection("ipc_shm_limits", "active", "shmmni, shmall, shmmax 0")
    except PermissionError:
        # Only the namespace's root may write them; an unmapped root leaves seccomp alone.
        why = "not root in the job's user namespace; seccomp denies shmget"
        report.protection("ipc_shm_limits", "unavailable", why)
    except OSError as exc:
        report.protection("ipc_shm_limits", "failed", exc.strerror or str(exc))


def _reap_job(status_w: int, job_pid: int) -> int:
    """In the init: reap everything until the job itself ends, then report it."""
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return EXIT_SETUP_FAILED
        if pid == job_pid:
            _write_line(
                status_w,
                f"X {wait_status} {usage.ru_utime:.6f} {usage.ru_stime:.6f} {usage.ru_maxrss}",
            )
            return 0


def _write_line(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (text + "\n").encode())


def _close_all_but(keep: list[int]) -> None:
    last = -1
    for fd in sorted(set(keep)):
        if fd > last + 1:
            os.closerange(last + 1, fd)
        last = fd
    os.closerange(last + 1, 0x7FFFFFFF)


def init_main(
    plan: LaunchPlan, job: JobSpec | None, report: _Reporter, *, pid_ns: bool, mount_ns: bool
) -> NoReturn:
    """Body of the init: isolate itself, fork the job, reap until the job ends.

    Being pid 1 of the job's namespace, its exit takes every other job process along.
    The job is its child rather than pid 1 itself, so the job keeps normal signal
    semantics (pid 1 ignores signals it has no handler for) and its orphans get reaped.
    """
    status = EXIT_SETUP_FAILED
    try:
        argv_note = _hide_agent_argv(report)
        minimal = _isolate_early(
            plan, report, pid_ns=pid_ns, mount_ns=mount_ns, argv_note=argv_note
        )
        if job is None:
            job = _receive_job(plan)
        job, on_tmpfs = _isolate_job(plan, job, report, mount_ns=mount_ns, minimal_root=minimal)
        exec_path, status_w = _isolate_late(plan, job, report, by_path=on_tmpfs)
        if plan.dry_run:
            report.done()
            os._exit(0)
        job_pid = os.fork()
        if job_pid == 0:
            _exec_job(plan, job, report, exec_path)
        # The job's pipes must reach EOF once the job's side is gone.
        for fd in (*range(6), report.fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        status = _reap_job(status_w, job_pid)
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        report.fail("job", detail)
    os._exit(status)


def _receive_job(plan: LaunchPlan) -> JobSpec:
    """Block until the agent hands over a job (or goes away)."""
    if plan.control_fd is None:
        raise OSError(22, "no job and no control socket")
    control = socket.socket(fileno=plan.control_fd)
    try:
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_SPEC_BYTES, 8)
    finally:
        control.detach()
        os.close(plan.control_fd)
    if not data:
        os._exit(0)  # the sandbox was closed before using this launcher
    return JobSpec.from_message(data, fds)


def _enter_workdir(job: JobSpec, *, by_path: bool) -> None:
    """cd by path when the path leads to the same directory (it may sit below a hidden
    path, re-exposed by a bind mount), so getcwd() works; else by descriptor. With the
    tmpfs work dir mounted, the host's directory is covered on purpose: only the path counts.
    """
    if by_path:
        os.chdir(job.workdir_path)
        return
    want = os.fstat(job.workdir_fd)
    try:
        os.chdir(job.workdir_path)
        here = os.stat(".")
        if (here.st_dev, here.st_ino) == (want.st_dev, want.st_ino):
            return
    except OSError:
        pass
    os.fchdir(job.workdir_fd)


def _exec_job(plan: LaunchPlan, job: JobSpec, report: _Reporter, exec_path: str) -> NoReturn:
    """In the job process: the per-process limits and the mode, then exec."""
    try:
        set_pdeathsig(signal.SIGKILL)
        if plan.child_setup is not None:
            plan.child_setup()
        isolation.set_rlimits(job.limits)
        os.execve(exec_path, list(job.argv), job.env)  # noqa: S606 (the job, on purpose)
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        report.fail("exec", detail)
    os._exit(EXIT_SETUP_FAILED)


def _hide_agent_argv(report: _Reporter) -> str:
    try:
        isolation.hide_argv(b"vcomp-init")
        return "the init's argv and environment overwritten"
    except OSError as exc:
        report.protection("private_proc", "failed", f"cannot overwrite argv: {exc.strerror}")
        return ""


def _isolate_early(
    plan: LaunchPlan, report: _Reporter, *, pid_ns: bool, mount_ns: bool, argv_note: str
) -> bool:
    """The job-independent part: the mounts (done ahead when prepared).

    Returns whether the job runs in the minimal root.
    """
    set_pdeathsig(signal.SIGKILL)
    if not mount_ns:
        why = "no private mount namespace"
        report.protection("hidden_paths", "unavailable", why)
        report.protection("minimal_root", "unavailable", f"{why}: the job sees the host's root")
        report.protection("no_ptmx", "unavailable", f"{why}: the host's /dev/ptmx is reachable")
        _report_proc(report, pid_ns=pid_ns, own_root=False, argv_note=argv_note)
        return False
    try:
        result = isolation.setup_mounts(
            new_proc=pid_ns,
            hidden=list(plan.hidden_paths),
            reexpose=list(plan.reexpose_paths),
            hostname=HOSTNAME,
            root_binds=list(plan.root_binds),
            owner=(plan.job_uid, plan.job_gid) if plan.privileged else (os.getuid(), os.getgid()),
        )
    except OSError as exc:
        report.protection("hidden_paths", "failed", f"mount: {exc.strerror}")
        report.protection("minimal_root", "failed", f"mount: {exc.strerror}")
        report.protection("no_ptmx", "failed", "no minimal root: the host's /dev is reachable")
        if argv_note:
            report.protection("private_proc", "failed", f"mount: {exc.strerror}")
        return False
    if result.root is not None:
        report.protection("minimal_root", "active", "read-only: " + ",".join(result.root.binds))
        report.protection("hidden_paths", "active", "everything outside the minimal root")
        report.protection("no_ptmx", "active", "/dev holds " + ",".join(rootfs.DEVICES))
        _report_proc(report, pid_ns=pid_ns, own_root=True, argv_note=argv_note)
        return True
    reason = "covered: " + ",".join(result.hidden)
    if result.missing:
        reason += "; absent: " + ",".join(result.missing)
    report.protection("hidden_paths", "active", reason)
    report.protection("minimal_root", "failed", f"{result.root_error}; host root, paths hidden")
    report.protection("no_ptmx", "failed", "no minimal root: the host's /dev/ptmx is reachable")
    _report_proc(report, pid_ns=pid_ns, own_root=False, argv_note=argv_note)
    return False


def _report_proc(report: _Reporter, *, pid_ns: bool, own_root: bool, argv_note: str) -> None:
    if not argv_note:
        return  # already reported as failed
    if pid_ns:
        where = "in the minimal root" if own_root else "over the host's /proc"
        report.protection(
            "private_proc", "active", f"the pid namespace's own, {where}; {argv_note}"
        )
    else:
        report.protection("private_proc", "unavailable", f"no pid namespace; {argv_note}")


def _isolate_job(
    plan: LaunchPlan, job: JobSpec, report: _Reporter, *, mount_ns: bool, minimal_root: bool
) -> tuple[JobSpec, bool]:
    """The job's tmpfs work dir (sized by its limits), then the identity drop, which
    takes away the privilege to mount. Returns the job as seen from inside, and whether
    its work dir is the tmpfs.
    """
    on_tmpfs = False
    if mount_ns:
        target = rootfs.JOB_DIR if minimal_root else job.workdir_path
        uid, gid = (plan.job_uid, plan.job_gid) if plan.privileged else (os.getuid(), os.getgid())
        try:
            inodes = rootfs.mount_workdir(target, job.limits.disk_bytes, uid, gid)
            size = f"{job.limits.disk_bytes} bytes, {inodes} inodes at {target}"
            report.protection("tmpfs_workdir", "active", size)
            on_tmpfs = True
            if minimal_root:
                env = {**job.env, "HOME": target, "TMPDIR": target}
                job = dataclasses.replace(job, env=env, workdir_path=target)
        except OSError as exc:
            if minimal_root:
                raise  # the minimal root has no other place for the job to write
            report.protection("tmpfs_workdir", "failed", f"mount: {exc.strerror}; host disk")
    else:
        report.protection(
            "tmpfs_workdir", "unavailable", "no private mount namespace: the host's disk"
        )
    _drop_identity(plan, report)
    return job, on_tmpfs


def _drop_identity(plan: LaunchPlan, report: _Reporter) -> None:
    if plan.privileged:
        isolation.drop_identity(plan.job_uid, plan.job_gid)
        report.protection("unprivileged_uid", "active", f"uid {plan.job_uid} gid {plan.job_gid}")
        # A user namespace of its own gives the job a private process count and leaves
        # root unmapped, so no set-user-ID binary can become root.
        if plan.namespaces:
            try:
                # Dropping root made the process non-dumpable, which makes its /proc
                # files root's; the id maps below must be writable by the job's uid.
                prctl(PR_SET_DUMPABLE, 1)
                unshare(CLONE_NEWUSER)
                isolation.write_id_maps(plan.job_uid, plan.job_uid, plan.job_gid, plan.job_gid)
                report.protection("user_namespace", "active", "entered after dropping root")
            except OSError as exc:
                report.protection("user_namespace", "unavailable", f"{exc.strerror}")
        set_pdeathsig(signal.SIGKILL)  # a credential change clears it
    else:
        uid = os.getuid()
        if uid == 0:
            raise OSError(1, "refusing to run a job as root")
        report.protection("unprivileged_uid", "active", f"uid {uid} (the agent's own, not root)")


def _isolate_late(
    plan: LaunchPlan, job: JobSpec, report: _Reporter, *, by_path: bool
) -> tuple[str, int]:
    """The job's descriptors, directory and the irreversible restrictions.

    Returns the path to exec and the status fd.
    """
    _enter_workdir(job, by_path=by_path)
    targets = {
        0: os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC),
        1: job.job_stdout,
        2: job.job_stderr,
        3: job.job_in,
        4: job.job_out,
    }
    if job.payload_fd is not None:
        targets[5] = job.payload_fd
    extras = [plan.setup_w, plan.status_w]
    extras += [job.code_fd] if job.code_fd is not None else []
    moved = isolation.arrange_fds(targets, extras)
    report.fd, status_w = moved[0], moved[1]
    exec_path = job.exec_path
    if job.code_fd is not None:
        exec_path = f"/proc/self/fd/{moved[2]}"
    report.protection("closed_fds", "active", "only fds 0-5 reach the job")
    isolation.reset_signals()

    # Applied in the job process after the fork, so the init's own allocations are free.
    report.protection("rlimits", "active", "cpu, as, nofile, nproc, fsize, core=0")
    set_no_new_privs()
    report.protection("no_new_privs", "active")

    if plan.landlock_abi > 0:
        try:
            ll = landlock.restrict_self(
                plan.landlock_abi, list(plan.read_paths), ["."], list(plan.rw_files)
            )
            report.protection("landlock", "active", f"ABI {ll.abi}, writes only in the work dir")
            report.protection(
                "landlock_net",
                "active" if ll.net_restricted else "unavailable",
                "" if ll.net_restricted else f"needs ABI 4, kernel has {ll.abi}",
            )
            report.protection(
                "landlock_scope",
                "active" if ll.signal_scoped else "unavailable",
                "signals and abstract sockets" if ll.signal_scoped else "needs ABI 6",
            )
        except OSError as exc:
            report.protection("landlock", "failed", exc.strerror or str(exc))
    else:
        report.protection("landlock", "unavailable", plan.landlock_reason)

    dropped = isolation.drop_capabilities()
    how = f"bounding set emptied ({dropped} dropped)" if dropped else "none held (not root)"
    report.protection("capabilities", "active", how)
    report.protection("cleared_environment", "active", ",".join(sorted(job.env)))

    if plan.seccomp_program is not None:
        try:
            install_seccomp_program(plan.seccomp_program)
            report.protection("seccomp", "active", plan.seccomp_builder)
        except OSError as exc:
            report.protection("seccomp", "failed", exc.strerror or str(exc))
    else:
        report.protection("seccomp", "unavailable", plan.seccomp_reason)
    return exec_path, status_w
