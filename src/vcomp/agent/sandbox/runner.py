"""The agent side of the sandbox: start a job, supervise it, kill its tree, classify it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from vcomp import logfmt
from vcomp.agent.modes import ExecutionMode, Regulator, child_setup
from vcomp.agent.sandbox import cgroup, landlock, pyjob
from vcomp.agent.sandbox.launcher import JobSpec, LaunchPlan, launcher_main
from vcomp.agent.sandbox.outcome import JobOutcome, OutcomeKind, Protection
from vcomp.agent.sandbox.policy import JOB_PATH, NOBODY, JobLimits
from vcomp.agent.sandbox.seccomp import SeccompProgram, build_program
from vcomp.agent.sandbox.supervise import OUT_OF_MEMORY, JobIO, classify
from vcomp.agent.sandbox.tree import JobTree
from vcomp.agent.sandbox.wipe import wipe_tree
from vcomp.errors import SandboxError, loggable

JobKind = Literal["python", "exec"]
log = logging.getLogger("vcomp.agent.sandbox")

# Without these the sandbox refuses to run a job (and ``doctor`` exits nonzero).
REQUIRED_PROTECTIONS = ("rlimits", "cleared_environment", "process_tree_kill", "unprivileged_uid")
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
CHILD_REPORTED = (
    "user_namespace",
    "mount_namespace",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
    "uts_namespace",
    "hidden_paths",
    "minimal_root",
    "tmpfs_workdir",
    "no_ptmx",
    "private_proc",
    "unprivileged_uid",
    "closed_fds",
    "rlimits",
    "no_new_privs",
    "landlock",
    "capabilities",
    "cleared_environment",
    "seccomp",
)
PER_PROCESS_ONLY = "total job memory is bounded only per process (RLIMIT_AS)"
TICK = 0.1  # how often CPU and memory are sampled
KILL_GRACE = 5.0  # how long to wait for a killed tree to be reaped


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
        self._cgroups: cgroup.CgroupHost | None = None
        self._cgroup_reason = "disabled by configuration"
        if use_cgroup:
            found = cgroup.find_host()
            if isinstance(found, str):
                self._cgroup_reason = found
            else:
                self._cgroups = found
                found.sweep_stale()
        # Two filters: a job without a cgroup is also denied shared memory (seccomp.py).
        self._seccomp: dict[bool, SeccompProgram] = {}
        self._seccomp_reason = "disabled by configuration"
        if use_seccomp:
            try:
                for deny in (False, True) if self._cgroups is not None else (True,):
                    self._seccomp[deny] = build_program(prefer_libseccomp, deny_shared_memory=deny)
            except OSError as exc:
                self._seccomp.clear()
                self._seccomp_reason = f"cannot build a filter: {exc.strerror or exc}"
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
        self._spare: _Prepared | None = None
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
    ) -> JobOutcome:
        """Run one job to its end. Cancelling the task kills the whole tree first.

        Setting ``cancel`` does the same but returns a ``cancelled`` outcome.
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
                _close_all(agent_ends)
                raise
            finally:
                _close_all(job_fds)
            return await self._supervise(launch, input, limits, on_progress, cancel, started)
        finally:
            if launch is not None:
                launch.close_agent_fds()
                self._drop_cgroup(launch.cgroup)
            # Off the loop (100k files take a second); a failure is logged, never raised.
            await asyncio.to_thread(_wipe, workdir)
            if self.prespawn and not self._closed and self._spare is None:
                self._spare = self._prepare()

    def close(self) -> None:
        """Stop the prepared launcher, if any. The sandbox cannot run jobs afterwards."""
        self._closed = True
        if self._spare is not None:
            self._drop_cgroup(self._spare.discard())
            self._spare = None
        if self._cgroups is not None:
            self._cgroups.retry_leftovers()

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
                payload_fd = _sealed_memfd("vcomp-python-job", payload)
                fds.append(payload_fd)
                argv = tuple(pyjob.python_argv(self.python))
                exec_path = self.python
            else:
                code_fd = _sealed_memfd("vcomp-job", code)
                fds.append(code_fd)
                argv = ("vcomp-job",)
                exec_path = "(the code memfd)"
        except BaseException:
            _close_all(fds)
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
    ) -> _Launch:
        in_w, out_r, so_r, se_r = agent_ends
        spare, self._spare = self._spare, None
        if spare is not None:
            note = self._limit_cgroup(spare.cgroup, spare.note, limits)
            if note.status == "active" or spare.cgroup is None:
                try:
                    spare.hand_over(job)
                    return _Launch(
                        spare.pid, in_w, out_r, so_r, se_r, spare.setup_r, spare.status_r
                    ).with_cgroup(spare.cgroup, note)
                except OSError:
                    pass  # it died meanwhile: start afresh
            self._drop_cgroup(spare.discard())
        cg, note = self._new_cgroup()
        note = self._limit_cgroup(cg, note, limits)
        if note.status != "active":
            self._drop_cgroup(cg)
            cg = None
        try:
            pid, setup_r, status_r = self._fork(job=job, control_fd=None, dry_run=False, cg=cg)
        except BaseException:
            self._drop_cgroup(cg)
            raise
        return _Launch(pid, in_w, out_r, so_r, se_r, setup_r, status_r).with_cgroup(cg, note)

    def _prepare(self) -> _Prepared | None:
        """Fork a launcher that isolates itself now and waits for the next job."""
        cg, note = self._new_cgroup()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, setup_r, status_r = self._fork(
                job=None, control_fd=theirs.fileno(), dry_run=False, cg=cg
            )
        except OSError:
            ours.close()
            self._drop_cgroup(cg)
            return None
        finally:
            theirs.close()
        return _Prepared(pid, ours, setup_r, status_r, cg, note)

    # --- the job's cgroup ---------------------------------------------------------------

    def _new_cgroup(self) -> tuple[cgroup.JobCgroup | None, Protection]:
        """A fresh job cgroup, and the protection line that says what the job got."""
        if self._cgroups is None:
            reason = f"{self._cgroup_reason}; {self._per_process_only()}"
            return None, Protection("cgroup", "unavailable", reason)
        try:
            cg = self._cgroups.new_job()
        except OSError as exc:
            reason = f"cannot create: {exc.strerror or exc}; {self._per_process_only()}"
            return None, Protection("cgroup", "failed", reason)
        return cg, Protection("cgroup", "active", self._cgroups.describe())

    def _per_process_only(self) -> str:
        if True in self._seccomp:
            return f"{PER_PROCESS_ONLY}; memfd_create, SysV shm and SIGCHLD auto-reaping denied"
        return f"{PER_PROCESS_ONLY}; without seccomp, memfds and SysV shm are unbounded"

    def _limit_cgroup(
        self, cg: cgroup.JobCgroup | None, note: Protection, limits: JobLimits
    ) -> Protection:
        """Memory covers the work directory too (a tmpfs whose pages are charged here)."""
        if cg is None:
            return note
        try:
            cg.set_limits(limits.memory_bytes + limits.disk_bytes, limits.max_processes)
        except OSError as exc:
            reason = f"cannot set limits: {exc.strerror or exc}; {self._per_process_only()}"
            return Protection("cgroup", "failed", reason)
        return note

    def _drop_cgroup(self, cg: cgroup.JobCgroup | None) -> None:
        """Remove a job's cgroup once its tree is dead; retried later if a task lingers."""
        if cg is not None and self._cgroups is not None and cg.remove() is not None:
            self._cgroups.leftovers.append(cg)

    def _plan(
        self,
        control_fd: int | None,
        setup_w: int,
        status_w: int,
        dry_run: bool,
        cg: cgroup.JobCgroup | None,
    ) -> LaunchPlan:
        mode = self.mode
        seccomp = self._seccomp.get(cg is None)
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
        setup_r, setup_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            plan = self._plan(control_fd, setup_w, status_w, dry_run, cg)
            pid = os.fork()
            if pid == 0:
                launcher_main(plan, job)  # never returns
        except BaseException:
            _close_all([setup_r, status_r])
            raise
        finally:
            _close_all([setup_w, status_w])
        return pid, setup_r, status_r

    def _probe(self) -> list[Protection]:
        limits = JobLimits(cpu_seconds=1, memory_bytes=1 << 30, wall_seconds=5, output_bytes=16)
        workdir = self._make_workdir()
        cg, note = self._new_cgroup()
        note = self._limit_cgroup(cg, note, limits)
        try:
            job, job_fds, agent_ends = self._job_spec("exec", b"", workdir, limits)
            try:
                live = cg if note.status == "active" else None
                pid, setup_r, status_r = self._fork(job=job, control_fd=None, dry_run=True, cg=live)
            finally:
                _close_all([*job_fds, *agent_ends])
            try:
                text = _read_all(setup_r)
                _, status = os.waitpid(pid, 0)
            finally:
                _close_all([setup_r, status_r])
        finally:
            self._drop_cgroup(cg)
            _wipe(workdir)
        reported, failure = parse_setup_lines(text)
        prots = self._merge_protections(
            reported, pid_ns_ok=_active(reported, "pid_namespace"), cgroup_note=note
        )
        if failure is not None or "D" not in text.split():
            reason = failure or f"launcher exit status {status}"
            prots.append(Protection("setup", "failed", reason))
        return prots

    def _merge_protections(
        self, reported: list[Protection], *, pid_ns_ok: bool, cgroup_note: Protection
    ) -> list[Protection]:
        names = {p.name for p in reported}
        merged = list(reported)
        for name in CHILD_REPORTED:
            if name not in names:
                merged.append(Protection(name, "failed", "not reported by the job's setup"))
        merged.append(Protection("memfd_code", "active", "code exists only in a sealed memfd"))
        merged.append(Protection("private_workdir", "active", "fresh per job, wiped afterwards"))
        how = "pid-namespace init + subreaper sweep" if pid_ns_ok else "subreaper sweep"
        merged.append(Protection("process_tree_kill", "active", how))
        merged.append(Protection("wall_clock", "active", "wall and idle limits kill the tree"))
        merged.append(cgroup_note)
        if self.mode is not None:
            merged.append(Protection("execution_mode", "active", self.mode.kind))
        return merged

    # --- supervising --------------------------------------------------------------------

    async def _supervise(
        self,
        launch: _Launch,
        input_bytes: bytes,
        limits: JobLimits,
        on_progress: Callable[[float], None] | None,
        cancel: asyncio.Event | None,
        started: float,
    ) -> JobOutcome:
        tree = JobTree(launch.pid, launch.cgroup)
        regulator = Regulator(self.mode) if self.mode is not None else None

        def active_clock() -> float:
            # Time the execution mode kept the job suspended does not count.
            paused = regulator.paused_seconds if regulator is not None else 0.0
            return time.monotonic() - paused

        io = JobIO(launch, input_bytes, limits, on_progress, active_clock)
        reg_task: asyncio.Task[None] | None = None
        kill_reason: tuple[OutcomeKind, str] | None = None
        try:
            io.attach(asyncio.get_running_loop())
            start_active = active_clock()
            last_sample = 0.0
            while io.job_status is None:
                if io.job_pid is not None and tree.job_pid is None:
                    tree.job_pid = io.job_pid
                    if regulator is not None:
                        reg_task = asyncio.create_task(regulator.supervise(tree))
                now_active = active_clock()
                wall_left = limits.wall_seconds - (now_active - start_active)
                idle_left = math.inf
                if limits.idle_seconds is not None:
                    idle_left = limits.idle_seconds - (now_active - io.last_frame_at)
                if io.violation is not None:
                    kill_reason = io.violation
                elif io.setup_failure is not None:
                    kill_reason = (OutcomeKind.SETUP_FAILED, io.setup_failure)
                elif cancel is not None and cancel.is_set():
                    kill_reason = (OutcomeKind.CANCELLED, "cancelled by the agent")
                elif wall_left <= 0:
                    kill_reason = (OutcomeKind.WALL_TIMEOUT, f"wall limit {limits.wall_seconds}s")
                elif idle_left <= 0:
                    kill_reason = (OutcomeKind.IDLE_TIMEOUT, f"no frame for {limits.idle_seconds}s")
                elif time.monotonic() - last_sample >= TICK:
                    last_sample = time.monotonic()
                    tree.sample_memory()
                    if tree.job_pid is not None and tree.cpu_seconds() > limits.cpu_seconds:
                        kill_reason = (
                            OutcomeKind.CPU_LIMIT,
                            f"tree over {limits.cpu_seconds}s CPU",
                        )
                    elif tree.out_of_memory():
                        kill_reason = (OutcomeKind.MEMORY_LIMIT, OUT_OF_MEMORY)
                if kill_reason is not None:
                    break
                await io.wait(min(wall_left, idle_left, TICK))
            if kill_reason is None:
                tree.cpu_seconds()  # a last sample before the sweep
            tree.kill()
            await io.finish(tree, KILL_GRACE)
        finally:
            # Also on cancellation: nothing of the job may outlive this call.
            tree.kill()
            io.detach()
            if reg_task is not None:
                reg_task.cancel()
            _reap_sync(launch.pid, tree)
        if reg_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await reg_task
        paused = regulator.paused_seconds if regulator is not None else 0.0
        reported, failure = parse_setup_lines(io.setup_text())
        prots = self._merge_protections(
            reported, pid_ns_ok=_active(reported, "pid_namespace"), cgroup_note=launch.cgroup_note
        )
        if kill_reason is None and failure is None:
            missing = [n for n in self.required if not _active(prots, n)]
            if missing:
                failure = "required protections not active: " + ", ".join(missing)
        return classify(
            io=io,
            tree=tree,
            limits=limits,
            kill_reason=kill_reason,
            setup_failure=failure,
            wall_seconds=time.monotonic() - started,
            paused_seconds=paused,
            protections=tuple(prots),
        )


class _Launch:
    """The agent's ends of one launch."""

    def __init__(
        self, pid: int, in_w: int, out_r: int, so_r: int, se_r: int, setup_r: int, status_r: int
    ) -> None:
        self.pid = pid
        self.in_w, self.out_r, self.so_r, self.se_r = in_w, out_r, so_r, se_r
        self.setup_r, self.status_r = setup_r, status_r
        self.cgroup: cgroup.JobCgroup | None = None
        self.cgroup_note = Protection("cgroup", "unavailable", PER_PROCESS_ONLY)

    def with_cgroup(self, cg: cgroup.JobCgroup | None, note: Protection) -> _Launch:
        self.cgroup, self.cgroup_note = cg, note
        return self

    def close_agent_fds(self) -> None:
        for name in ("in_w", "out_r", "so_r", "se_r", "setup_r", "status_r"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class _Prepared:
    """A launcher that has isolated itself and waits for a job on its control socket."""

    def __init__(
        self,
        pid: int,
        control: socket.socket,
        setup_r: int,
        status_r: int,
        cg: cgroup.JobCgroup | None,
        note: Protection,
    ) -> None:
        self.pid, self.control = pid, control
        self.setup_r, self.status_r = setup_r, status_r
        self.cgroup, self.note = cg, note

    def hand_over(self, job: JobSpec) -> None:
        done, _ = os.waitpid(self.pid, os.WNOHANG)
        if done:
            raise OSError(errno.ESRCH, "the prepared launcher has exited")
        data, fds = job.to_message()
        socket.send_fds(self.control, [data], fds)
        self.control.close()

    def discard(self) -> cgroup.JobCgroup | None:
        """Stop the launcher; returns its cgroup, for the sandbox to remove."""
        self.control.close()  # EOF: the init exits, and so does the launcher
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        _close_all([self.setup_r, self.status_r])
        return self.cgroup


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def parse_setup_lines(text: str) -> tuple[list[Protection], str | None]:
    prots: dict[str, Protection] = {}
    failure: str | None = None
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if parts[0] == "P" and len(parts) >= 3 and parts[2] in ("active", "unavailable", "failed"):
            status: Literal["active", "unavailable", "failed"] = parts[2]  # type: ignore[assignment]
            prots[parts[1]] = Protection(parts[1], status, parts[3] if len(parts) > 3 else "")
        elif parts[0] == "F":
            failure = line[2:]
    return list(prots.values()), failure


def _active(prots: Iterable[Protection], name: str) -> bool:
    return any(p.name == name and p.status == "active" for p in prots)


def _sealed_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _reap_sync(pid: int, tree: JobTree) -> None:
    """Make sure the launcher is gone and reaped; kills it if it lingers."""
    deadline = time.monotonic() + KILL_GRACE
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done == pid:
            return
        if time.monotonic() > deadline:
            tree.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        time.sleep(0.002)


def _wipe(workdir: Path) -> None:
    """Remove the job's work tree; a failure is logged (the tree may stay) and the
    job's outcome still goes out. The next start-up clears what stayed."""
    try:
        wipe_tree(workdir)
    except Exception as exc:  # no wipe failure may cost the job's outcome
        logfmt.event(
            log, "workdir_wipe_failed", logging.ERROR, path=str(workdir), error=loggable(exc)
        )
