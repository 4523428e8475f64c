"""What became of a job, and which protections guarded it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

ProtectionStatus = Literal["active", "unavailable", "failed"]


class OutcomeKind(StrEnum):
    OK = "ok"
    NONZERO_EXIT = "nonzero_exit"
    SIGNALED = "signaled"
    CPU_LIMIT = "cpu_limit"
    MEMORY_LIMIT = "memory_limit"
    WALL_TIMEOUT = "wall_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    OUTPUT_TOO_LARGE = "output_too_large"
    PROTOCOL_VIOLATION = "protocol_violation"
    SETUP_FAILED = "setup_failed"
    CANCELLED = "cancelled"


# Exit codes of ``vcomp-agent sandbox-run``, one per outcome class.
EXIT_CODES: dict[OutcomeKind, int] = {
    OutcomeKind.OK: 0,
    OutcomeKind.NONZERO_EXIT: 10,
    OutcomeKind.SIGNALED: 11,
    OutcomeKind.CPU_LIMIT: 12,
    OutcomeKind.MEMORY_LIMIT: 13,
    OutcomeKind.WALL_TIMEOUT: 14,
    OutcomeKind.IDLE_TIMEOUT: 15,
    OutcomeKind.OUTPUT_TOO_LARGE: 16,
    OutcomeKind.PROTOCOL_VIOLATION: 17,
    OutcomeKind.SETUP_FAILED: 18,
    OutcomeKind.CANCELLED: 19,
}


@dataclass(frozen=True, slots=True)
class Protection:
    """One protection of the sandbox; ``reason`` says why it is not active, or how it is."""

    name: str
    status: ProtectionStatus
    reason: str = ""


@dataclass(frozen=True, slots=True)
class JobOutcome:
    kind: OutcomeKind
    result: bytes | None = None  # the RESULT payload, only for OK
    error: str | None = None  # the job's ERROR text, or what the sandbox saw
    exit_code: int | None = None
    signal: int | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    paused_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    progress: float | None = None  # the last PROGRESS value
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    protections: tuple[Protection, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.OK

    def active_protections(self) -> list[str]:
        return [p.name for p in self.protections if p.status == "active"]

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no result bytes: those are the job's output)."""
        data = asdict(self)
        data["kind"] = self.kind.value
        data.pop("result")
        data["result_bytes"] = None if self.result is None else len(self.result)
        data["stdout_tail"] = self.stdout_tail.decode("utf-8", "replace")
        data["stderr_tail"] = self.stderr_tail.decode("utf-8", "replace")
        return data
