"""The agent's handles on a launch: forking the launcher, a prepared launcher that waits
for its job, and the agent's ends of one running launch."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
from collections.abc import Callable, Iterable

from vcomp.agent.sandbox import cgroup
from vcomp.agent.sandbox.launcher import launcher_main
from vcomp.agent.sandbox.outcome import Protection
from vcomp.agent.sandbox.plan import JobSpec, LaunchPlan


class Launch:
    """The agent's ends of one launch."""

    def __init__(
        self,
        pid: int,
        agent_ends: tuple[int, int, int, int],
        setup_r: int,
        status_r: int,
        *,
        cg: cgroup.JobCgroup | None,
        cgroup_note: Protection,
    ) -> None:
        self.pid = pid
        self.in_w, self.out_r, self.so_r, self.se_r = agent_ends
        self.setup_r, self.status_r = setup_r, status_r
        self.cgroup, self.cgroup_note = cg, cgroup_note

    def close_agent_fds(self) -> None:
        for name in ("in_w", "out_r", "so_r", "se_r", "setup_r", "status_r"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class PreparedLauncher:
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
        close_all([self.setup_r, self.status_r])
        return self.cgroup


def fork_launcher(
    job: JobSpec | None, plan_for: Callable[[int, int], LaunchPlan]
) -> tuple[int, int, int]:
    """Fork the launcher with the plan ``plan_for(setup_w, status_w)``; returns its pid
    and the agent's ends of the setup and status pipes."""
    setup_r, setup_w = os.pipe()
    status_r, status_w = os.pipe()
    try:
        plan = plan_for(setup_w, status_w)
        pid = os.fork()
        if pid == 0:
            launcher_main(plan, job)  # never returns
    except BaseException:
        close_all([setup_r, status_r])
        raise
    finally:
        close_all([setup_w, status_w])
    return pid, setup_r, status_r


def sealed_memfd(name: str, data: bytes) -> int:
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


def read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
