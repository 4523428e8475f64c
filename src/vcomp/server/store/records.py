"""The job store's records: frozen dataclasses of plain values, and their enums.

Every backend returns these and nothing else, so the scheduler, the CLI and the rules in
``rules.py`` never see a row or a connection. The vocabulary is in the package docstring.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vcomp.protocol.capacity import UNLIMITED, JobCapacity

#: The ``status`` of a successful result; any other status is a failed attempt.
RESULT_OK = "ok"
#: A batch's job work-directory limit when its submitter sets none.
DEFAULT_DISK_BYTES = 64 << 20
#: Seconds over which an agent's refusals are counted against its cap.
REFUSAL_WINDOW = 3600.0

#: Seconds for code and input out and the result back, on a slow link. A lease is never
#: renewed past ``leased_at + lease_seconds + wall_seconds + transfer_seconds``.
DEFAULT_TRANSFER_SECONDS = 300.0


class AppKind(enum.StrEnum):
    PYTHON = "python"
    EXEC = "exec"


class JobState(enum.StrEnum):
    """State of a logical job. ``queued`` means at least one replica awaits a lease."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


class AttemptState(enum.StrEnum):
    LEASED = "leased"
    SUCCEEDED = "succeeded"  # an ok result arrived for it
    ERRORED = "errored"  # a result with a non-ok status arrived for it
    EXPIRED = "expired"  # the lease deadline passed
    RELEASED = "released"  # handed back (RESET, server-side transfer failure)
    REFUSED = "refused"  # the agent refused it: not charged, never offered to it again
    ABANDONED = "abandoned"  # the agent handed it back (shutdown): not charged


class OutcomeKind(enum.StrEnum):
    """What :meth:`Store.record_results` did with one submission."""

    ACCEPTED = "accepted"  # the current lease; counted
    LATE = "late"  # lease had expired but the job still wanted it; counted
    DUPLICATE = "duplicate"  # (job, attempt) already recorded; nothing changed
    EVIDENCE = "evidence"  # recorded for the record, changes no state (stale attempt)
    REJECTED = "rejected"  # not recorded (unknown attempt, wrong agent, bad checksum)


@dataclass(frozen=True, slots=True)
class App:
    app_id: int
    name: str
    version: int
    kind: AppKind
    size: int
    sha256: bytes
    created_at: float
    # Operator hooks, ``module:function`` (see vcomp.server.hooks); None: byte-equal
    # replicas agree, and nothing is called after a job is done.
    validator: str | None = None
    assimilator: str | None = None
    retired_at: float | None = None  # retired: no new batch may use this version


@dataclass(frozen=True, slots=True)
class JobLimits:
    cpu_seconds: float
    memory_bytes: int
    wall_seconds: float
    output_bytes: int
    disk_bytes: int = DEFAULT_DISK_BYTES


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: int
    app: App
    created_at: float
    n_jobs: int
    replicas: int
    quorum: int
    max_attempts: int
    limits: JobLimits
    deadline: float | None

    @property
    def attempt_budget(self) -> int:
        return self.replicas * self.max_attempts


@dataclass(frozen=True, slots=True)
class Job:
    job_id: int
    batch_id: int
    index: int
    state: JobState
    input_size: int
    input_sha256: bytes
    attempts: int  # leases issued so far (all replicas)
    pending: int  # replica slots waiting for a lease
    leased: int  # replica slots currently leased
    disagreements: int
    canonical_attempt: int | None
    reason: str | None  # why it failed (or the last attempt failure while still live)
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class Lease:
    job_id: int
    attempt: int
    agent_id: str
    batch_id: int
    index: int
    app: App
    input_size: int
    input_sha256: bytes
    limits: JobLimits
    deadline: float  # lease deadline; renew before it or the job is requeued
    batch_deadline: float | None


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    agent_id: str
    now: float
    lease_seconds: float
    capacity: JobCapacity = UNLIMITED  # only jobs within it
    refusal_cap: int | None = None  # no lease once the agent refused this many per window
    server_id: str | None = None  # the issuing server: its leases end if it falls silent


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    job_id: int
    attempt: int
    agent_id: str
    state: AttemptState
    leased_at: float
    deadline: float
    ended_at: float | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    job_id: int
    attempt: int
    agent_id: str
    job_state: JobState  # after the expiry: queued again, or failed (budget used up)


@dataclass(frozen=True, slots=True)
class UploadHandle:
    """A staged result blob the server fills chunk by chunk before recording it."""

    upload_id: int
    job_id: int
    attempt: int
    total: int


@dataclass(frozen=True, slots=True)
class ResultSubmission:
    """One result as the server received it.

    Give the output either inline (``output``, small) or as a finished staged
    ``upload``; an upload needs ``output_sha256`` (the agent's claim, verified).
    ``output_size`` and ``output_sha256`` are optional checks for inline output.
    """

    job_id: int
    attempt: int
    agent_id: str
    status: str = RESULT_OK
    output: bytes | None = None
    upload: UploadHandle | None = None
    output_size: int | None = None
    output_sha256: bytes | None = None
    cpu_ms: int = 0
    wall_ms: int = 0
    received_at: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    job_id: int
    attempt: int
    kind: OutcomeKind
    job_state: JobState | None  # None when rejected for an unknown job
    detail: str = ""

    @property
    def durable(self) -> bool:
        """True when the result is in the store, so the agent may drop its copy."""
        return self.kind is not OutcomeKind.REJECTED


@dataclass(frozen=True, slots=True)
class StoredResult:
    job_id: int
    attempt: int
    agent_id: str
    status: str
    error: str
    output_size: int
    output_sha256: bytes
    cpu_ms: int
    wall_ms: int
    received_at: float
    counted: bool  # False for evidence-only results


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One job of a batch for ``iter_results``: the canonical result when done."""

    job_id: int
    index: int
    input_sha256: bytes
    state: JobState
    reason: str | None
    result: StoredResult | None  # canonical (done) or the last counted one (failed)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    agent_id: str
    name: str
    ak_public_pem: str
    enrolled_at: float
    last_seen: float | None
    address: str | None
    revoked_at: float | None = None  # revoked: its key is refused from then on


@dataclass(frozen=True, slots=True)
class AgentClock:
    clock: int
    reset_count: int
    restart_count: int


@dataclass(frozen=True, slots=True)
class Measurement:
    text: str
    note: str
    added_at: float


@dataclass(frozen=True, slots=True)
class BatchStatus:
    batch_id: int
    app_name: str
    app_version: int
    created_at: float
    deadline: float | None
    total: int
    queued: int
    leased: int
    done: int
    failed: int
    disagreements: int
    cancelled: int = 0  # jobs cancelled before they finished (counted apart from failed)
    cancelled_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.done + self.failed + self.cancelled == self.total


@dataclass(frozen=True, slots=True)
class FailedJob:
    """A job that failed for good, and why (for the dashboard's recent failures)."""

    batch_id: int
    index: int
    job_id: int
    reason: str
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class StoreStatus:
    agents: int
    jobs: Mapping[JobState, int]
    batches: tuple[BatchStatus, ...]


@dataclass(frozen=True, slots=True)
class CandidateResult:
    """What a comparator sees of one ok result; ``read()`` loads the output."""

    job_id: int
    attempt: int
    agent_id: str
    output_size: int
    output_sha256: bytes
    read: Callable[[], bytes] = field(compare=False, repr=False)


#: Decides whether two results agree. Must be an equivalence relation.
ResultComparator = Callable[[CandidateResult, CandidateResult], bool]
#: The comparator of one app (its validator, or byte equality).
ComparatorFor = Callable[[App], ResultComparator]


@dataclass(frozen=True, slots=True)
class AssimilationDue:
    """A done job whose app's assimilator has not yet returned for it."""

    job_id: int
    batch_id: int
    index: int
    canonical_attempt: int
    app: App
    tries: int  # calls that raised so far


@dataclass(frozen=True, slots=True)
class ValidationDue:
    """A job of a validator app whose ok results include pairs not yet judged."""

    job_id: int
    batch_id: int
    index: int
    app: App
    pairs: tuple[tuple[int, int], ...]  # (attempt, later attempt) to ask the validator


@dataclass(frozen=True, slots=True)
class PairVerdict:
    """The validator's answer for two attempts; ``error``: it failed (a disagreement)."""

    attempt_a: int
    attempt_b: int
    agree: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class HookFailure:
    """A job whose hook failed: ``hook`` is "validator" or "assimilator"."""

    job_id: int
    batch_id: int
    index: int
    hook: str
    error: str
    tries: int
    retry_at: float | None  # the assimilator's next call; None: not due


SCOPES = ("read", "submit", "admin")
"""API token scopes, ordered: each may do everything the ones before it may."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An HTTP API token as stored: its name and scope; the token itself is never kept."""

    name: str
    scope: str
    created_at: float
    revoked_at: float | None


CONNECTED_SECONDS = 10.0
"""An agent seen this recently has a live session: servers touch theirs every 2 s."""


@dataclass(frozen=True, slots=True)
class AgentCredit:
    """What an agent gave: jobs whose ok result counted, and their CPU-seconds."""

    jobs_done: int
    cpu_seconds: float


CANCELLED_REASON = "cancelled"
"""The reason a cancelled job carries: it is ``failed``, but nobody's failure."""


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A job's latest uploaded checkpoint and the attempt that wrote it."""

    job_id: int
    attempt: int
    saved_at: float
    data: bytes
