"""The agent side of the sandbox: one object that runs jobs, one at a time.

``Sandbox`` holds what stays from job to job (the paths the job sees, the seccomp
filters, the job cgroups, the prepared launcher) and puts a job's pieces together:
its work dir and pipes (here), the launch (``launch``), the supervision
(``supervise``) and the protections report (``protections``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from vcomp import logfmt
from vcomp.agent.modes import ExecutionMode, child_setup
from vcomp.agent.sandbox import cgroup, landlock, pyjob
from vcomp.agent.sandbox.cgroup_policy import CgroupPolicy
from vcomp.agent.sandbox.hold import JobControl
from vcomp.agent.sandbox.launch import (
    Launch,
    PreparedLauncher,
    close_all,
    fork_launcher,
    read_all,
    sealed_memfd,
)
from vcomp.agent.sandbox.outcome import JobOutcome, Protection
from vcomp.agent.sandbox.pipes import Checkpointing
from vcomp.agent.sandbox.plan import JobSpec, LaunchPlan
from vcomp.agent.sandbox.policy import JOB_PATH, NOBODY, JobLimits
from vcomp.agent.sandbox.protections import REQUIRED_PROTECTIONS, from_setup
from vcomp.agent.sandbox.seccomp import SeccompProgram, build_program
from vcomp.agent.sandbox.supervise import supervise
from vcomp.agent.sandbox.wipe import wipe_tree
from vcomp.errors import SandboxError, loggable

JobKind = Literal["python", "exec"]
log = logging.getLogger("vcomp.agent.sandbox")

SYSTEM_READ_PATHS = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc",
    "/proc",
    "/dev",
    "/sys/devices/system/cpu",
)
RW_FILES = ("/dev/null",)
# Besides the system directories and the runtime, the minimal root holds (read-only):
ROOT_EXTRA_BINDS = ("/sys/devices/system/cpu",)  # os.cpu_count() and numpy read it
# Covered by empty tmpfs in the job's mount namespace (hidden, not used as temp dirs).
DEFAULT_HIDDEN = (
    "/tmp",  # noqa: S108
    "/var/tmp",  # noqa: S108
    "/dev/shm",  # noqa: S108
    "/run",
    "/home",
    "/root",
    "/mnt",
    "/media",
)


class Sandbox:
    """Runs one job at a time as an isolated, limited process tree.

    The job runs in a minimal root (``rootfs``): the system directories, the
    interpreter's and ``read_paths`` (extra directories the job may read), read-only,
    and its work dir, a tmpfs of ``limits.disk_bytes``. Where that root cannot be built,
    ``hidden_paths`` (the agent's state and key directories, for instance) are covered
    by empty read-only tmpfs mounts inside the job's mount namespace; ``/tmp``,
    ``/run``, ``/home``, ``/root`` and the agent's home are always covered.

    With ``prespawn`` (the default), after each job the sandbox forks the launcher for
    the next one, which isolates itself (namespaces, mounts, identity) and waits; the
    next ``run`` only hands it the job. ``close()`` stops that waiting launcher.
    """

    def __init__(
        self,
        *,
        work_root: Path,
        mode: ExecutionMode | None = None,
        hidden_paths: Sequence[Path] = (),
        read_paths: Sequence[Path] = (),
        job_uid: int = NOBODY,
        job_gid: int = NOBODY,
        python: str | None = None,
        namespaces: bool = True,
        use_landlock: bool = True,
        use_seccomp: bool = True,
        prefer_libseccomp: bool = True,
        required: Iterable[str] = REQUIRED_PROTECTIONS,
        prespawn: bool = True,
        use_cgroup: bool = True,
    ) -> None:
        if sys.platform != "linux":
            raise SandboxError(f"the sandbox needs Linux, this is {sys.platform}")
        self.work_root = Path(work_root).absolute()
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.privileged = os.geteuid() == 0
        self.job_uid, self.job_gid = job_uid, job_gid
        if self.privileged:
            os.chmod(self.work_root, 0o711)  # noqa: S103 - the job's uid must reach its own directory
        self.python = python or sys.executable
        self.namespaces = namespaces
        self.required = tuple(required)
        self.landlock_abi = landlock.abi_version() if use_landlock else 0
        self._landlock_reason = (
            "disabled by configuration" if not use_landlock else "kernel has no Landlock"
        )
        found = cgroup.find_host() if use_cgroup else "disabled by configuration"
        if isinstance(found, cgroup.CgroupHost):
            found.sweep_stale()
        # Up to three filters, by (no cgroup, no freezer): a job without a cgroup is also
        # denied shared memory, and one without a freezer sending SIGCONT (seccomp.py).
        self._seccomp: dict[tuple[bool, bool], SeccompProgram] = {}
        self._seccomp_reason = "disabled by configuration"
        if use_seccomp:
            kinds = [(True, True)]
            if not isinstance(found, str):
                kinds += [(False, False), (False, True)]
            try:
                for no_cgroup, no_freezer in kinds:
                    self._seccomp[(no_cgroup, no_freezer)] = build_program(
                        prefer_libseccomp, deny_shared_memory=no_cgroup, deny_sigcont=no_freezer
                    )
            except OSError as exc:
                self._seccomp.clear()
                self._seccomp_reason = f"cannot build a filter: {exc.strerror or exc}"
        self._cgroups = CgroupPolicy(found, seccomp_denies_shm=(True, True) in self._seccomp)
        self._guest_compiled = self.python == sys.executable
        self._guest_sources = pyjob.guest_sources()
        if self._guest_compiled:
            self._guest_sources = pyjob.precompile(self._guest_sources)
        self._site_dirs = pyjob.site_dirs()
        runtime = [*pyjob.runtime_paths(), str(Path(self.python).resolve().parent)]
        self._read_paths = tuple(
            dict.fromkeys([*SYSTEM_READ_PATHS, *runtime, *(str(p) for p in read_paths)])
        )
        home = os.path.expanduser("~")
        hidden = [*DEFAULT_HIDDEN, home, *(str(Path(p).absolute()) for p in hidden_paths)]
        self._hidden = tuple(dict.fromkeys(h for h in hidden if h not in ("/", "")))
        self._reexpose = tuple(dict.fromkeys([*runtime, *(str(p) for p in read_paths)]))
        self._root_binds = (*self._reexpose, *ROOT_EXTRA_BINDS)
        self._probe_cache: list[Protection] | None = None
        self.prespawn = prespawn
        self._spare: PreparedLauncher | None = None
        self._closed = False

    # --- public API -------------------------------------------------------------------

    def protections(self) -> list[Protection]:
        """What the sandbox gives on this machine, found by a dry run of the real setup."""
        if self._probe_cache is None:
            self._probe_cache = self._probe()
        return list(self._probe_cache)

    async def run(
        self,
        *,
        kind: JobKind,
        code: bytes,
        input: bytes,
        limits: JobLimits,
        on_progress: Callable[[float], None] | None = None,
        cancel: asyncio.Event | None = None,
        control: JobControl | None = None,
        checkpoints: Checkpointing | None = None,
    ) -> JobOutcome:
        """Run one job to its end. Cancelling the task kills the whole tree first.

        Setting ``cancel`` does the same but returns a ``cancelled`` outcome. ``control``
        lets the agent hold the job still (see :mod:`.hold`) and read its CPU time.
        ``checkpoints`` hands the job a state to resume from and takes its checkpoints.
        """
        if kind not in ("python", "exec"):
            raise SandboxError(f"unknown job kind {kind!r}")
        if self._closed:
            raise SandboxError("the sandbox is closed")
        started = time.monotonic()
        workdir = self._make_workdir()
        launch = None
        try:
            job, job_fds, agent_ends = self._job_spec(kind, code, workdir, limits)
            try:
                launch = self._launch(job, agent_ends, limits)
            except BaseException:
                close_all(agent_ends)
                raise
            finally:
                close_all(job_fds)
            return await supervise(
                launch,
                input,
                limits,
                mode=self.mode,
                required=self.required,
                on_progress=on_progress,
                cancel=cancel,
                started=started,
                control=control,
                checkpoints=checkpoints,
            )
        finally:
            if launch is not None:
                launch.close_agent_fds()
                self._cgroups.drop(launch.cgroup)
            # Off the loop (100k files take a second); a failure is logged, never raised.
            await asyncio.to_thread(_wipe, workdir)
            if self.prespawn and not self._closed and self._spare is None:
                self._spare = self._prepare()

    def close(self) -> None:
        """Stop the prepared launcher, if any. The sandbox cannot run jobs afterwards."""
        self._closed = True
        if self._spare is not None:
            self._cgroups.drop(self._spare.discard())
            self._spare = None
        self._cgroups.close()

    # --- starting -----------------------------------------------------------------------

    def _make_workdir(self) -> Path:
        workdir = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_root))
        if self.privileged:
            os.chown(workdir, self.job_uid, self.job_gid)
        return workdir

    def _job_spec(
        self, kind: JobKind, code: bytes, workdir: Path, limits: JobLimits
    ) -> tuple[JobSpec, list[int], tuple[int, int, int, int]]:
        """The job's part of the launch: the spec, the descriptors that go to the job (to
        close once handed over) and the agent's ends (input, frames, stdout, stderr).
        """
        fds: list[int] = []
        try:
            in_r, in_w = os.pipe()
            fds += [in_r, in_w]
            out_r, out_w = os.pipe()
            fds += [out_r, out_w]
            so_r, so_w = os.pipe()
            fds += [so_r, so_w]
            se_r, se_w = os.pipe()
            fds += [se_r, se_w]
            workdir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(workdir_fd)
            payload_fd = code_fd = None
            if kind == "python":
                payload = pyjob.build_payload(
                    code, self._guest_sources, self._site_dirs, compiled=self._guest_compiled
                )
                payload_fd = sealed_memfd("vcomp-python-job", payload)
                fds.append(payload_fd)
                argv = tuple(pyjob.python_argv(self.python))
                exec_path = self.python
            else:
                code_fd = sealed_memfd("vcomp-job", code)
                fds.append(code_fd)
                argv = ("vcomp-job",)
                exec_path = "(the code memfd)"
        except BaseException:
            close_all(fds)
            raise
        env = {"PATH": JOB_PATH, "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
        job = JobSpec(
            argv=argv,
            exec_path=exec_path,
            env=env,
            limits=limits,
            job_in=in_r,
            job_out=out_w,
            job_stdout=so_w,
            job_stderr=se_w,
            workdir_fd=workdir_fd,
            workdir_path=str(workdir),
            payload_fd=payload_fd,
            code_fd=code_fd,
        )
        agent_ends = (in_w, out_r, so_r, se_r)
        return job, [fd for fd in fds if fd not in agent_ends], agent_ends

    def _launch(
        self, job: JobSpec, agent_ends: tuple[int, int, int, int], limits: JobLimits
    ) -> Launch:
        spare, self._spare = self._spare, None
        if spare is not None:
            note = self._cgroups.limit(spare.cgroup, spare.note, limits)
            if note.status == "active" or spare.cgroup is None:
                try:
                    spare.hand_over(job)
                    return Launch(
                        spare.pid,
                        agent_ends,
                        spare.setup_r,
                        spare.status_r,
                        cg=spare.cgroup,
                        cgroup_note=note,
                    )
                except OSError:
                    pass  # it died meanwhile: start afresh
            self._cgroups.drop(spare.discard())
        cg, note = self._cgroups.new()
        note = self._cgroups.limit(cg, note, limits)
        if note.status != "active":
            self._cgroups.drop(cg)
            cg = None
        try:
            pid, setup_r, status_r = self._fork(job=job, control_fd=None, dry_run=False, cg=cg)
        except BaseException:
            self._cgroups.drop(cg)
            raise
        return Launch(pid, agent_ends, setup_r, status_r, cg=cg, cgroup_note=note)

    def _prepare(self) -> PreparedLauncher | None:
        """Fork a launcher that isolates itself now and waits for the next job."""
        cg, note = self._cgroups.new()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, setup_r, status_r = self._fork(
                job=None, control_fd=theirs.fileno(), dry_run=False, cg=cg
            )
        except OSError:
            ours.close()
            self._cgroups.drop(cg)
            return None
        finally:
            theirs.close()
        return PreparedLauncher(pid, ours, setup_r, status_r, cg, note)

    def _plan(
        self,
        control_fd: int | None,
        setup_w: int,
        status_w: int,
        dry_run: bool,
        cg: cgroup.JobCgroup | None,
    ) -> LaunchPlan:
        mode = self.mode
        seccomp = self._seccomp.get((cg is None, cg is None or not cg.can_freeze))
        return LaunchPlan(
            setup_w=setup_w,
            status_w=status_w,
            privileged=self.privileged,
            job_uid=self.job_uid,
            job_gid=self.job_gid,
            namespaces=self.namespaces,
            hidden_paths=self._hidden,
            reexpose_paths=(*self._reexpose, str(self.work_root)),
            root_binds=self._root_binds,
            landlock_abi=self.landlock_abi,
            landlock_reason=self._landlock_reason,
            read_paths=self._read_paths,
            rw_files=RW_FILES,
            seccomp_program=seccomp.program if seccomp else None,
            seccomp_builder=seccomp.builder if seccomp else "",
            seccomp_reason=self._seccomp_reason,
            child_setup=(lambda: child_setup(mode)) if mode is not None else None,
            dry_run=dry_run,
            control_fd=control_fd,
            cgroup_procs=cg.procs_files() if cg is not None else (),
            cap_ipc_shm=cg is None,
        )

    def _fork(
        self,
        *,
        job: JobSpec | None,
        control_fd: int | None,
        dry_run: bool,
        cg: cgroup.JobCgroup | None,
    ) -> tuple[int, int, int]:
        """Fork the launcher; returns its pid and the agent's ends of setup and status."""

        def plan_for(setup_w: int, status_w: int) -> LaunchPlan:
            return self._plan(control_fd, setup_w, status_w, dry_run, cg)

        return fork_launcher(job, plan_for)

    def _probe(self) -> list[Protection]:
        limits = JobLimits(cpu_seconds=1, memory_bytes=1 << 30, wall_seconds=5, output_bytes=16)
        workdir = self._make_workdir()
        cg, note = self._cgroups.new()
        note = self._cgroups.limit(cg, note, limits)
        try:
            job, job_fds, agent_ends = self._job_spec("exec", b"", workdir, limits)
            try:
                live = cg if note.status == "active" else None
                pid, setup_r, status_r = self._fork(job=job, control_fd=None, dry_run=True, cg=live)
            finally:
                close_all([*job_fds, *agent_ends])
            try:
                text = read_all(setup_r)
                _, status = os.waitpid(pid, 0)
            finally:
                close_all([setup_r, status_r])
        finally:
            self._cgroups.drop(cg)
            _wipe(workdir)
        prots, failure = from_setup(text, mode=self.mode, cgroup_note=note)
        if failure is not None or "D" not in text.split():
            reason = failure or f"launcher exit status {status}"
            prots.append(Protection("setup", "failed", reason))
        return prots


def _wipe(workdir: Path) -> None:
    """Remove the job's work tree; a failure is logged (the tree may stay) and the
    job's outcome still goes out. The next start-up clears what stayed."""
    try:
        wipe_tree(workdir)
    except Exception as exc:  # no wipe failure may cost the job's outcome
        logfmt.event(
            log, "workdir_wipe_failed", logging.ERROR, path=str(workdir), error=loggable(exc)
        )
