"""What a launch is made of: the per-sandbox ``LaunchPlan`` and the per-job ``JobSpec``.

The agent builds both and forks the launcher with them; a prepared launcher, forked
before its job was known, gets the JobSpec later over its control socket, encoded by
``JobSpec.to_message`` (JSON plus the descriptors, SCM_RIGHTS).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from vcomp.agent.sandbox.policy import JobLimits

MAX_SPEC_BYTES = 1 << 20  # an encoded JobSpec's JSON, at most


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
