"""The job store interface: what the scheduler and the CLI may ask of any backend.

Everything here is backend-neutral: records are frozen dataclasses of plain values,
payloads are read through :class:`BlobReader` ranges, and every failure is a
:class:`~vcomp.errors.StoreError`. ``store_sqlite.SqliteStore`` is the embedded
implementation; a PostgreSQL backend would implement the same :class:`Store`.

Vocabulary
    *app*: versioned job code. *batch*: one submission, many inputs. *job*: one input
    of a batch (the logical job). *attempt*: one lease of a job to one agent; attempts
    are numbered 1, 2, ... per job across all replicas, so ``(job_id, attempt)`` names a
    lease, its result, and the idempotency key of that result.

Replication (BOINC's redundant computing)
    A job wants ``quorum`` results that agree under a :data:`ResultComparator`. It starts
    with ``replicas`` replica slots. Distinct-host rule: an agent never gets a lease on a
    job while it holds another live lease or an ok result for it (an agent whose attempt
    failed may try again). The
    attempt budget, shared by all replicas of the job, is ``replicas * max_attempts``:
    failed attempts (error status, expired or released lease) and the extra replicas
    issued after a disagreement all draw on it. When the budget can no longer produce a
    quorum the job fails with a recorded reason.

Refusals and fit
    A lease goes only to an agent whose declared :class:`JobCapacity` holds the batch's
    limits and app kind. An agent that refuses its live lease (its job does not fit
    after all, its sandbox failed, it hands the job back) costs the job nothing: the
    attempt ends ``refused`` (never offered to that agent again) or ``abandoned``
    (offered again later), neither draws on the budget, and each counts towards the
    agent's refusals per :data:`REFUSAL_WINDOW`; at the request's ``refusal_cap`` the
    agent gets no lease until older refusals leave the window.

Results and stale attempts
    A result is idempotent on ``(job_id, attempt)``: the first one recorded wins, a resend
    is reported ``duplicate`` and changes nothing. A result for the live lease is
    ``accepted``. A result whose lease expired or was released is ``late`` (and counts)
    only if the job still waits for an unleased replica and the agent holds no other
    live lease or result for the job; otherwise it is kept as ``evidence`` (stored with
    its origin, never counted, never changes the job). Renewing or releasing an attempt
    that is no longer the live lease is a no-op that reports so. Every outcome except
    ``rejected`` is durable, so the server may ACK it and the agent may drop its copy.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import BinaryIO, Protocol

from vcomp.errors import StoreError
from vcomp.protocol.capacity import UNLIMITED, JobCapacity

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_TRANSFER_SECONDS",
    "REFUSAL_WINDOW",
    "RESULT_OK",
    "AgentClock",
    "AgentRecord",
    "App",
    "AppKind",
    "AttemptRecord",
    "AttemptState",
    "Batch",
    "BatchStatus",
    "BlobReader",
    "CandidateResult",
    "CodeSource",
    "ExpiredLease",
    "Job",
    "JobLimits",
    "JobState",
    "Lease",
    "LeaseRequest",
    "Measurement",
    "OutcomeKind",
    "RecordOutcome",
    "ResultComparator",
    "ResultRecord",
    "ResultSubmission",
    "Store",
    "StoreError",
    "StoreStatus",
    "StoredResult",
    "UploadHandle",
    "Verdict",
    "group_results",
    "is_disagreement",
    "judge",
    "sha256_equal",
]

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

    @property
    def finished(self) -> bool:
        return self.done + self.failed == self.total


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


def sha256_equal(a: CandidateResult, b: CandidateResult) -> bool:
    """The default comparator: byte-equal outputs (compared by size and SHA-256)."""
    return a.output_size == b.output_size and a.output_sha256 == b.output_sha256


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a live job stands after a result, a failed attempt or an expiry."""

    state: JobState
    pending: int  # replica slots that should wait for a lease
    canonical_attempt: int | None = None  # set when done
    reason: str | None = None  # set when failed


def group_results(
    candidates: Sequence[CandidateResult], comparator: ResultComparator, quorum: int
) -> list[list[CandidateResult]]:
    """Partition ok results (in attempt order) into groups that agree.

    With ``quorum == 1`` the first result wins and nothing is compared.
    """
    if quorum == 1:
        return [list(candidates[:1])] if candidates else []
    groups: list[list[CandidateResult]] = []
    for candidate in candidates:
        for group in groups:
            try:
                same = comparator(group[0], candidate)
            except Exception as exc:
                raise StoreError(f"result comparator failed: {exc}") from exc
            if same:
                group.append(candidate)
                break
        else:
            groups.append([candidate])
    return groups


def is_disagreement(groups: Sequence[Sequence[CandidateResult]], attempt: int) -> bool:
    """Did the result of ``attempt`` agree with nobody while other results exist?"""
    if len(groups) < 2:
        return False
    return any(len(g) == 1 and g[0].attempt == attempt for g in groups)


def judge(
    groups: Sequence[Sequence[CandidateResult]],
    *,
    quorum: int,
    budget: int,
    pending: int,
    leased: int,
    attempts: int,
    last_failure: str | None,
) -> Verdict:
    """The replication rule every backend applies (see the module docstring).

    Done once a group reaches ``quorum`` (its earliest attempt is canonical). Otherwise
    issue just enough replica slots that the outstanding ones could still reach a
    quorum, as far as the attempt budget allows; when they cannot, fail with a reason.
    """
    best = max((len(g) for g in groups), default=0)
    if best >= quorum:
        winner = next(g for g in groups if len(g) >= quorum)
        return Verdict(JobState.DONE, 0, canonical_attempt=winner[0].attempt)
    needed = quorum - best
    outstanding = pending + leased
    if outstanding < needed:
        room = max(0, budget - attempts - pending)
        extra = min(needed - outstanding, room)
        pending += extra
        outstanding += extra
    if outstanding < needed:
        if groups:
            reason = (
                f"no quorum: {sum(len(g) for g in groups)} results in {len(groups)} "
                f"disagreeing groups, largest {best} of {quorum} needed; "
                f"attempt budget {budget} used up"
            )
        else:
            reason = (
                f"failed after {attempts} attempts (budget {budget}); "
                f"last: {last_failure or 'unknown'}"
            )
        return Verdict(JobState.FAILED, 0, reason=reason)
    return Verdict(JobState.QUEUED if pending > 0 else JobState.LEASED, pending)


class BlobReader(Protocol):
    """Random-access reads of one stored payload (code, input or output)."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> bytes: ...

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at the end)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> BlobReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


#: Job code: a file path, or a binary stream (give ``size`` if it is not seekable).
CodeSource = str | os.PathLike[str] | BinaryIO


class Store(Protocol):
    """The job store. Every method raises :class:`StoreError` on bad input."""

    def close(self) -> None: ...

    # apps
    def add_app(
        self, name: str, kind: AppKind | str, code: CodeSource, *, size: int | None = None
    ) -> App: ...
    def get_app(self, name: str, version: int | None = None) -> App: ...
    def get_app_by_id(self, app_id: int) -> App: ...
    def list_apps(self) -> list[App]: ...
    def open_code(self, app_id: int) -> BlobReader: ...
    def read_code_chunk(self, app_id: int, offset: int, n: int) -> bytes: ...

    # batches and jobs
    def create_batch(
        self,
        app_name: str,
        inputs: Iterable[bytes],
        *,
        app_version: int | None = None,
        replicas: int = 1,
        quorum: int | None = None,
        max_attempts: int = 3,
        cpu_seconds: float = 60.0,
        memory_bytes: int = 256 << 20,
        wall_seconds: float = 120.0,
        output_bytes: int = 1 << 20,
        disk_bytes: int = DEFAULT_DISK_BYTES,
        deadline: float | None = None,
    ) -> int: ...
    def get_batch(self, batch_id: int) -> Batch: ...
    def list_batches(self) -> list[Batch]: ...
    def get_job(self, job_id: int) -> Job: ...
    def get_job_by_index(self, batch_id: int, index: int) -> Job: ...
    def list_attempts(self, job_id: int) -> list[AttemptRecord]: ...
    def open_input(self, job_id: int) -> BlobReader: ...
    def read_input_chunk(self, job_id: int, offset: int, n: int) -> bytes: ...

    # leasing
    def lease_next(self, agent_id: str, now: float, lease_seconds: float) -> Lease | None: ...
    def lease_many(self, requests: Sequence[LeaseRequest]) -> list[Lease | None]: ...
    def renew_lease(
        self,
        job_id: int,
        attempt: int,
        now: float,
        lease_seconds: float,
        *,
        transfer_seconds: float = DEFAULT_TRANSFER_SECONDS,
    ) -> float | None: ...
    def release_lease(
        self, job_id: int, attempt: int, reason: str, *, now: float | None = None
    ) -> bool: ...
    def refuse_lease(
        self,
        job_id: int,
        attempt: int,
        agent_id: str,
        reason: str,
        *,
        now: float,
        offer_again: bool = False,
    ) -> int | None: ...
    def expire_leases(self, now: float) -> list[ExpiredLease]: ...

    # results
    def attempt_owner(self, job_id: int, attempt: int) -> tuple[str, int] | None: ...
    def begin_result_upload(self, job_id: int, attempt: int, total: int) -> UploadHandle: ...
    def write_result_chunk(
        self, handle: UploadHandle, offset: int, data: bytes | bytearray | memoryview
    ) -> None: ...
    def finish_upload(self, handle: UploadHandle, output_sha256: bytes) -> None: ...
    def discard_upload(self, handle: UploadHandle) -> None: ...
    def discard_stale_uploads(self, before: float) -> int: ...
    def record_results(self, results: Sequence[ResultSubmission]) -> list[RecordOutcome]: ...
    def result_exists(self, job_id: int, attempt: int) -> bool: ...
    def list_results(self, job_id: int) -> list[StoredResult]: ...
    def open_output(self, job_id: int, attempt: int) -> BlobReader: ...
    def iter_results(self, batch_id: int) -> Iterator[ResultRecord]: ...

    # agents
    def enroll_agent(self, agent_id: str, ak_public_pem: str, name: str) -> AgentRecord: ...
    def get_agent(self, agent_id: str) -> AgentRecord: ...
    def find_agent(self, agent_id: str) -> AgentRecord | None: ...
    def list_agents(self) -> list[AgentRecord]: ...
    def set_agent_clock(
        self, agent_id: str, clock: int, reset_count: int, restart_count: int
    ) -> None: ...
    def get_agent_clock(self, agent_id: str) -> AgentClock | None: ...
    def touch_agent(self, agent_id: str, now: float, address: str | None) -> None: ...

    # measurement allowlist
    def allow_measurement(self, text: str, note: str = "") -> Measurement: ...
    def list_measurements(self) -> list[Measurement]: ...
    def is_measurement_allowed(self, text: str) -> bool: ...
    def remove_measurement(self, text: str) -> None: ...

    # reset requests (CLI writes, server polls)
    def request_reset(self, agent_id: str) -> None: ...
    def take_reset_requests(self) -> list[str]: ...

    # status
    def status(self) -> StoreStatus: ...
    def batch_status(self, batch_id: int) -> BatchStatus: ...
