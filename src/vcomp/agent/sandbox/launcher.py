"""The forked processes between the agent and the job.

1. The *launcher* (forked from the agent) starts a session, becomes a child
   subreaper, enters the new namespaces and forks the init.
2. The *init* (pid 1 of the job's pid namespace) overwrites the agent's argv it
   inherited, pivots into the minimal root, mounts the job's tmpfs work dir, drops its
   identity, applies Landlock, no_new_privs and seccomp to itself, forks the job and
   reaps until the job ends; its exit then takes every other process of the namespace
   along, and with the last of them the mount namespace and the work dir go. Its
   confinement steps are in ``confinement``.
3. The *job process* sets its rlimits and execution mode and execs the job's code.

A *prepared* launcher does steps 1 and the job-independent half of 2 (up to the
minimal root) ahead of time, then waits on a control socket for the JobSpec (``plan``:
JSON plus descriptors, SCM_RIGHTS). The work dir's size comes with the job, and
mounting it needs the privilege that dropping the identity gives up, so both happen
after the job arrives.

None of them returns into the agent's code: every path ends in ``os._exit``. They
talk to the agent through two pipes, one short line per item (the setup lines are
written and read in ``protections``).

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
import os
import signal
import socket
import traceback
from typing import NoReturn

from vcomp.agent.sandbox import isolation
from vcomp.agent.sandbox.confinement import (
    hide_agent_argv,
    isolate_early,
    isolate_job,
    isolate_late,
)
from vcomp.agent.sandbox.libc import CLONE_NEWUSER, PR_SET_CHILD_SUBREAPER, prctl, set_pdeathsig
from vcomp.agent.sandbox.plan import MAX_SPEC_BYTES, JobSpec, LaunchPlan
from vcomp.agent.sandbox.protections import SetupReporter

EXIT_SETUP_FAILED = 127


def launcher_main(plan: LaunchPlan, job: JobSpec | None) -> NoReturn:
    """Body of the launcher process (the agent's forked child). Without ``job`` it
    prepares everything it can, then waits for the JobSpec on ``plan.control_fd``.
    """
    report = SetupReporter(plan.setup_w)
    status = EXIT_SETUP_FAILED
    try:
        status = _launcher(plan, job, report)
    except BaseException as exc:  # must never unwind into the agent's code
        report.fail("launcher", f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(status)


def _launcher(plan: LaunchPlan, job: JobSpec | None, report: SetupReporter) -> int:
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


def _cap_ipc_shm(report: SetupReporter, not_entered: str | None) -> None:
    if not_entered is not None:
        report.protection("ipc_shm_limits", "unavailable", f"no IPC namespace: {not_entered}")
        return
    try:
        isolation.cap_ipc_shm()
        report.protection("ipc_shm_limits", "active", "shmmni, shmall, shmmax, msgmni, msgmnb 0")
    except PermissionError:
        # Only the namespace's root may write them; an unmapped root leaves seccomp alone.
        why = "not root in the job's user namespace; seccomp denies shmget and msgget"
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
    plan: LaunchPlan, job: JobSpec | None, report: SetupReporter, *, pid_ns: bool, mount_ns: bool
) -> NoReturn:
    """Body of the init: isolate itself, fork the job, reap until the job ends.

    Being pid 1 of the job's namespace, its exit takes every other job process along.
    The job is its child rather than pid 1 itself, so the job keeps normal signal
    semantics (pid 1 ignores signals it has no handler for) and its orphans get reaped.
    """
    status = EXIT_SETUP_FAILED
    try:
        argv_note = hide_agent_argv(report)
        minimal = isolate_early(plan, report, pid_ns=pid_ns, mount_ns=mount_ns, argv_note=argv_note)
        if job is None:
            job = _receive_job(plan)
        job, on_tmpfs = isolate_job(plan, job, report, mount_ns=mount_ns, minimal_root=minimal)
        exec_path, status_w = isolate_late(plan, job, report, by_path=on_tmpfs)
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


def _exec_job(plan: LaunchPlan, job: JobSpec, report: SetupReporter, exec_path: str) -> NoReturn:
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
