"""The job store interface: what the scheduler and the CLI may ask of any backend."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import BinaryIO, Protocol

from vcomp.server.store.records import (
    DEFAULT_DISK_BYTES,
    DEFAULT_TRANSFER_SECONDS,
    AgentClock,
    AgentCredit,
    AgentRecord,
    ApiToken,
    App,
    AppKind,
    AssimilationDue,
    AttemptRecord,
    Batch,
    BatchStatus,
    ExpiredLease,
    FailedJob,
    HookFailure,
    Job,
    JobState,
    Lease,
    LeaseRequest,
    Measurement,
    PairVerdict,
    RecordOutcome,
    ResultRecord,
    ResultSubmission,
    StoredCheckpoint,
    StoredResult,
    StoreStatus,
    UploadHandle,
    ValidationDue,
)


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

    def __enter__(self) -> Store: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    # apps
    def add_app(
        self,
        name: str,
        kind: AppKind | str,
        code: CodeSource,
        *,
        size: int | None = None,
        validator: str | None = None,
        assimilator: str | None = None,
    ) -> App: ...
    def retire_app(self, name: str, version: int) -> App:
        """Refuse this version to new batches (and skip it when no version is named)."""
        ...

    def get_app(self, name: str, version: int | None = None) -> App: ...
    def get_app_by_id(self, app_id: int) -> App: ...
    def list_apps(self) -> list[App]: ...
    def open_code(self, app_id: int) -> BlobReader: ...
    def read_code_chunk(self, app_id: int, offset: int, n: int) -> bytes: ...

    # operator hooks (vcomp.server.hooks)
    def due_validations(self, now: float, limit: int) -> list[ValidationDue]: ...
    def record_verdicts(
        self, job_id: int, verdicts: Sequence[PairVerdict], now: float
    ) -> JobState: ...
    def due_assimilations(self, now: float, limit: int) -> list[AssimilationDue]: ...
    def assimilated(self, job_id: int, now: float) -> None: ...
    def assimilation_failed(self, job_id: int, error: str, retry_at: float) -> None: ...
    def hook_failures(self, limit: int = 20) -> list[HookFailure]: ...

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
    def cancel_batch(self, batch_id: int) -> int:
        """Fail the batch's queued and leased jobs with reason ``cancelled``; how many.
        Results still arriving for them are kept as evidence, never counted."""
        ...

    def retry_failed(self, batch_id: int) -> tuple[int | None, list[int]]:
        """Submit the failed (not cancelled) jobs' inputs again as a new batch with the
        same app version and limits: (its id, or None when none failed; the original
        indices, in the new batch's order)."""
        ...

    def get_batch(self, batch_id: int) -> Batch: ...
    def list_batches(self) -> list[Batch]: ...
    def newest_batch_id(self) -> int:
        """The id of the newest batch (0: none); a cheap "new work was added" mark."""

    def get_job(self, job_id: int) -> Job: ...
    def failed_jobs(self, batch_id: int, limit: int = 10) -> list[Job]: ...
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
    def release_orphaned_leases(self, now: float, silent_since: float) -> list[ExpiredLease]:
        """Release leases issued by servers not heard from since ``silent_since``."""
        ...

    # servers sharing the store
    def server_alive(self, server_id: str, address: str, now: float) -> None:
        """Register or refresh (heartbeat) a server."""
        ...

    def list_servers(self) -> list[tuple[str, str, float, float]]:
        """(id, address, started at, last seen) of the servers heard from lately."""
        ...

    def create_token(self, name: str, scope: str, token_sha256: bytes) -> ApiToken:
        """Store an API token's digest under ``name`` with ``scope``."""
        ...

    def find_token(self, token_sha256: bytes) -> ApiToken | None:
        """The live (not revoked) token with this SHA-256, or None."""
        ...

    def list_tokens(self) -> list[ApiToken]: ...

    def save_checkpoint(
        self, job_id: int, attempt: int, agent_id: str, data: bytes, *, max_bytes: int = ...
    ) -> None:
        """Keep ``data`` as the job's latest checkpoint; StoreError (nothing kept) unless
        ``agent_id`` holds the live lease of (job, attempt), ``data`` is within bounds
        and no later attempt's checkpoint is kept."""
        ...

    def latest_checkpoint(self, job_id: int) -> StoredCheckpoint | None: ...

    def open_checkpoint(self, job_id: int) -> tuple[int, BlobReader] | None:
        """(attempt that wrote it, range reader) of the job's latest checkpoint."""
        ...

    def drop_finished_checkpoints(self, limit: int = ...) -> int:
        """Forget checkpoints of jobs no attempt will resume (done or failed)."""
        ...

    def revoke_token(self, name: str) -> None:
        """Refuse the token from now on; revoking twice is harmless."""
        ...

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

    def revoke_agent(self, agent_id: str) -> AgentRecord:
        """Refuse the agent's key at every handshake from now on; the record stays."""
        ...

    def agent_credit(self) -> dict[str, AgentCredit]:
        """Per agent id: jobs whose ok result counted, and their CPU-seconds."""
        ...

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

    # reset requests: the CLI writes them, every server polls them and resets the
    # sessions it holds (an agent's workers may be on several servers)
    def request_reset(self, agent_id: str) -> None: ...
    def reset_requests_after(self, after: int) -> list[tuple[int, str]]:
        """``(request id, agent id)`` of requests newer than id ``after``, oldest first."""
        ...

    def newest_reset_request(self) -> int:
        """The newest request id (0: none): where a starting server begins polling."""
        ...

    def prune_reset_requests(self, before: float) -> int:
        """Forget requests made before ``before``; returns how many."""
        ...

    # status
    def status(self) -> StoreStatus: ...
    def batch_status(self, batch_id: int) -> BatchStatus: ...
    def recent_failures(self, limit: int) -> list[FailedJob]:
        """The ``limit`` most recently created jobs that failed for good, newest first."""
        ...

    def queued_by_app(self) -> dict[str, int]:
        """Jobs waiting for an agent, per app name: every app with a live version (0 when
        none wait), and a retired one only while jobs of it still wait."""
        ...
