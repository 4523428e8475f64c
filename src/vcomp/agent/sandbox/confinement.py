"""The init's confinement steps, in the order it takes them, each reporting its protection.

``isolate_early`` needs no job (a prepared launcher's init does it ahead of time): the
mounts and the minimal root. ``isolate_job`` mounts the job's tmpfs work dir, sized by
its limits, then drops the identity, which takes away the privilege to mount.
``isolate_late`` arranges the job's descriptors and applies the irreversible
restrictions (no_new_privs, Landlock, capabilities, seccomp). The primitives are in
``isolation``; the processes that call these steps are in ``launcher``.
"""

from __future__ import annotations

import dataclasses
import os
import signal

from vcomp.agent.sandbox import isolation, landlock, rootfs
from vcomp.agent.sandbox.libc import (
    CLONE_NEWUSER,
    PR_SET_DUMPABLE,
    install_seccomp_program,
    prctl,
    set_no_new_privs,
    set_pdeathsig,
    unshare,
)
from vcomp.agent.sandbox.plan import JobSpec, LaunchPlan
from vcomp.agent.sandbox.protections import SetupReporter

HOSTNAME = "vcomp-job"


def hide_agent_argv(report: SetupReporter) -> str:
    try:
        isolation.hide_argv(b"vcomp-init")
        return "the init's argv and environment overwritten"
    except OSError as exc:
        report.protection("private_proc", "failed", f"cannot overwrite argv: {exc.strerror}")
        return ""


def isolate_early(
    plan: LaunchPlan, report: SetupReporter, *, pid_ns: bool, mount_ns: bool, argv_note: str
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


def _report_proc(report: SetupReporter, *, pid_ns: bool, own_root: bool, argv_note: str) -> None:
    if not argv_note:
        return  # already reported as failed
    if pid_ns:
        where = (
            "in the minimal root, boot_id and cmdline masked"
            if own_root
            else "over the host's /proc"
        )
        report.protection(
            "private_proc", "active", f"the pid namespace's own, {where}; {argv_note}"
        )
    else:
        report.protection("private_proc", "unavailable", f"no pid namespace; {argv_note}")


def isolate_job(
    plan: LaunchPlan, job: JobSpec, report: SetupReporter, *, mount_ns: bool, minimal_root: bool
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


def _drop_identity(plan: LaunchPlan, report: SetupReporter) -> None:
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


def isolate_late(
    plan: LaunchPlan, job: JobSpec, report: SetupReporter, *, by_path: bool
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
