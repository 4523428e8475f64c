"""How the sandbox uses cgroups: a fresh, limited cgroup per job, removed afterwards,
and the ``cgroup`` protection line that says what bounds the job's tree (or, without
one, what still bounds it per process). The kernel side is in ``cgroup``.
"""

from __future__ import annotations

from vcomp.agent.sandbox import cgroup
from vcomp.agent.sandbox.outcome import Protection
from vcomp.agent.sandbox.policy import JobLimits

PER_PROCESS_ONLY = "total job memory is bounded only per process (RLIMIT_AS)"


class CgroupPolicy:
    """The job cgroups of one sandbox.

    ``found`` is what ``cgroup.find_host`` gave (or why there is no host);
    ``seccomp_denies_shm`` says whether a job without a cgroup runs under the filter
    that denies shared memory, which is what bounds it then.
    """

    def __init__(self, found: cgroup.CgroupHost | str, *, seccomp_denies_shm: bool) -> None:
        self.host = found if isinstance(found, cgroup.CgroupHost) else None
        self._reason = found if isinstance(found, str) else ""
        self._seccomp = seccomp_denies_shm
        if seccomp_denies_shm:
            self._per_process = (
                f"{PER_PROCESS_ONLY}; memfd_create, SysV shm and messages, "
                "SIGCHLD auto-reaping and SIGCONT denied"
            )
        else:
            self._per_process = (
                f"{PER_PROCESS_ONLY}; without seccomp, memfds, SysV shm and messages are unbounded"
            )

    def new(self) -> tuple[cgroup.JobCgroup | None, Protection]:
        """A fresh job cgroup, and the protection line that says what the job got."""
        if self.host is None:
            reason = f"{self._reason}; {self._per_process}"
            return None, Protection("cgroup", "unavailable", reason)
        try:
            cg = self.host.new_job()
        except OSError as exc:
            reason = f"cannot create: {exc.strerror or exc}; {self._per_process}"
            return None, Protection("cgroup", "failed", reason)
        reason = self.host.describe()
        if not cg.can_freeze:
            # The throttle then stops the tree with SIGSTOP, which SIGCONT would undo.
            denied = ", SIGCONT denied" if self._seccomp else ", SIGCONT not denied (no seccomp)"
            reason += f"; no freezer: suspended with SIGSTOP{denied}"
        return cg, Protection("cgroup", "active", reason)

    def limit(self, cg: cgroup.JobCgroup | None, note: Protection, limits: JobLimits) -> Protection:
        """Memory covers the work directory too (a tmpfs whose pages are charged here)."""
        if cg is None:
            return note
        try:
            cg.set_limits(limits.memory_bytes + limits.disk_bytes, limits.max_processes)
        except OSError as exc:
            reason = f"cannot set limits: {exc.strerror or exc}; {self._per_process}"
            return Protection("cgroup", "failed", reason)
        return note

    def drop(self, cg: cgroup.JobCgroup | None) -> None:
        """Remove a job's cgroup once its tree is dead; retried later if a task lingers."""
        if cg is not None and self.host is not None and cg.remove() is not None:
            self.host.leftovers.append(cg)

    def close(self) -> None:
        """Retry the removals that a lingering task deferred."""
        if self.host is not None:
            self.host.retry_leftovers()
