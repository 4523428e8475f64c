"""What one agent can run: the maxima it declares in READY.

The agent takes them from its volunteer's ``[limits]``; the server leases a
session only jobs within them (BOINC matches jobs to host resources), so an
honest agent never has to refuse a job for its size. READY travels encrypted
under the session key, so these numbers are as authentic as the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from vcomp.errors import DecodeError
from vcomp.protocol import limits

__all__ = ["JOB_KINDS", "UNLIMITED", "JobCapacity"]

JOB_KINDS: Final = ("python", "exec")
"""Every job kind of the protocol, in the order READY lists them."""

U32: Final = 0xFFFF_FFFF
U64: Final = 0xFFFF_FFFF_FFFF_FFFF
MAX_JOB_BYTES: Final = limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCapacity:
    """The largest job an agent takes: each START field at most this, kind in ``kinds``."""

    memory_bytes: int = U64
    cpu_seconds: int = U32
    wall_seconds: int = U32
    output_bytes: int = limits.MAX_RESULT_SIZE
    job_bytes: int = MAX_JOB_BYTES
    """``code_size + input_size``."""
    disk_bytes: int = U64
    kinds: tuple[str, ...] = JOB_KINDS

    def __post_init__(self) -> None:
        bounds = (
            ("memory_bytes", self.memory_bytes, 1, U64),
            ("cpu_seconds", self.cpu_seconds, 1, U32),
            ("wall_seconds", self.wall_seconds, 1, U32),
            ("output_bytes", self.output_bytes, 0, limits.MAX_RESULT_SIZE),
            ("job_bytes", self.job_bytes, 1, MAX_JOB_BYTES),
            ("disk_bytes", self.disk_bytes, 1, U64),
        )
        for name, value, low, high in bounds:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise DecodeError(f"capacity {name} {value!r} is outside {low}..{high}")
        check_kinds(self.kinds)

    @classmethod
    def clamped(
        cls,
        *,
        memory_bytes: int,
        cpu_seconds: float,
        wall_seconds: float,
        output_bytes: int,
        job_bytes: int,
        disk_bytes: int,
        kinds: tuple[str, ...] = JOB_KINDS,
    ) -> JobCapacity:
        """A capacity from a volunteer's limits, rounded down into the wire's bounds."""
        return cls(
            memory_bytes=min(max(memory_bytes, 1), U64),
            cpu_seconds=min(max(int(cpu_seconds), 1), U32),
            wall_seconds=min(max(int(wall_seconds), 1), U32),
            output_bytes=min(max(output_bytes, 0), limits.MAX_RESULT_SIZE),
            job_bytes=min(max(job_bytes, 1), MAX_JOB_BYTES),
            disk_bytes=min(max(disk_bytes, 1), U64),
            kinds=kinds,
        )


def check_kinds(value: object) -> None:
    """1 to len(JOB_KINDS) distinct known kinds (a READY field, and JobCapacity's)."""
    if type(value) is not tuple or not 1 <= len(value) <= len(JOB_KINDS):
        raise DecodeError(f"kinds must be 1-{len(JOB_KINDS)} job kinds")
    if len(set(value)) != len(value) or not all(k in JOB_KINDS for k in value):
        raise DecodeError(f"kinds must be distinct members of {list(JOB_KINDS)}")


UNLIMITED: Final = JobCapacity()
"""What the protocol itself allows (an agent that declares no limits of its own)."""
