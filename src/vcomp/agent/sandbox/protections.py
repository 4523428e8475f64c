"""The protections report: what the job got, line by line, from its setup to ``doctor``.

The launcher and the init write one line per protection on the setup pipe as they
apply it (``SetupReporter``; the line format is in ``launcher``'s docstring). The agent
reads those lines back (``parse_setup_lines``) and completes them with what it
provides itself (``from_setup``): the same list goes into every job's outcome and into
the probe that ``doctor`` shows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from vcomp.agent.sandbox.outcome import Protection

if TYPE_CHECKING:
    from vcomp.agent.modes import ExecutionMode

# Without these the sandbox refuses to run a job (and ``doctor`` exits nonzero).
REQUIRED_PROTECTIONS = ("rlimits", "cleared_environment", "process_tree_kill", "unprivileged_uid")
# What the job's setup must report; one it leaves out counts as failed.
CHILD_REPORTED = (
    "user_namespace",
    "mount_namespace",
    "pid_namespace",
    "net_namespace",
    "ipc_namespace",
    "uts_namespace",
    "cgroup_namespace",
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


class SetupReporter:
    """The launcher's and the init's writer of setup lines (they never raise)."""

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


def from_setup(
    text: str, *, mode: ExecutionMode | None, cgroup_note: Protection
) -> tuple[list[Protection], str | None]:
    """Every protection of a job, from its setup's lines and the agent's own part;
    and the setup's failure, if it reported one."""
    reported, failure = parse_setup_lines(text)
    names = {p.name for p in reported}
    merged = list(reported)
    for name in CHILD_REPORTED:
        if name not in names:
            merged.append(Protection(name, "failed", "not reported by the job's setup"))
    merged.append(Protection("memfd_code", "active", "code exists only in a sealed memfd"))
    merged.append(Protection("private_workdir", "active", "fresh per job, wiped afterwards"))
    pid_ns_ok = is_active(reported, "pid_namespace")
    how = "pid-namespace init + subreaper sweep" if pid_ns_ok else "subreaper sweep"
    merged.append(Protection("process_tree_kill", "active", how))
    merged.append(Protection("wall_clock", "active", "wall and idle limits kill the tree"))
    merged.append(cgroup_note)
    if mode is not None:
        merged.append(Protection("execution_mode", "active", mode.kind))
    return merged, failure


def missing_required(prots: Iterable[Protection], required: Iterable[str]) -> str | None:
    """Why the job may not count, if a required protection is not active."""
    prots = list(prots)
    missing = [n for n in required if not is_active(prots, n)]
    if missing:
        return "required protections not active: " + ", ".join(missing)
    return None


def is_active(prots: Iterable[Protection], name: str) -> bool:
    return any(p.name == name and p.status == "active" for p in prots)
