""":class:`SqlStore`: a job store over SQL, composed of one repository per concern.

The repositories share one :class:`~.database.Database` (connections, transactions,
schema version; each backend's docstring has its thread and durability rules), speak
through a :class:`~.database.Dialect` and a :class:`~.database.Blobs` where backends
differ, and call :mod:`vcomp.server.store.rules` for every decision. This class only
wires them together and routes each :class:`~vcomp.server.store.Store` method to its
repository. A backend (``SqliteStore``, ``PostgresStore``) is a database, a dialect and
a blob store handed to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Self

from vcomp.server.store.interface import BlobReader, CodeSource, Store
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
    ResultComparator,
    ResultRecord,
    ResultSubmission,
    StoredCheckpoint,
    StoredResult,
    StoreStatus,
    UploadHandle,
    ValidationDue,
)
from vcomp.server.store.rules import DEFAULT_SAME_FAILURES, sha256_equal
from vcomp.server.store.sql.agents import Agents
from vcomp.server.store.sql.batch_control import BatchControl, SpooledInputs
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.checkpoints import MAX_CHECKPOINT_BYTES, Checkpoints
from vcomp.server.store.sql.database import Blobs, Database, Dialect
from vcomp.server.store.sql.hooks import HookWork
from vcomp.server.store.sql.leases import Leases
from vcomp.server.store.sql.replicas import Replicas
from vcomp.server.store.sql.results import Results
from vcomp.server.store.sql.servers import Servers
from vcomp.server.store.sql.tokens import Tokens
from vcomp.server.store.sql.uploads import Uploads


class SqlStore:
    """The job store over one database; a backend subclass opens the database."""

    def __init__(
        self,
        database: Database,
        dialect: Dialect,
        blobs: Blobs,
        *,
        comparator: ResultComparator = sha256_equal,
        clock: Callable[[], float] = time.time,
        same_failures: int = DEFAULT_SAME_FAILURES,
    ) -> None:
        self.database = db = database
        self._catalog = catalog = Catalog(db, dialect, blobs, clock)
        self._agents = agents = Agents(db, clock)
        replicas = Replicas(catalog, dialect, blobs, comparator)
        self._leases = Leases(db, dialect, catalog, agents, replicas, clock)
        self._uploads = uploads = Uploads(db, blobs, catalog, clock)
        self._results = Results(
            db, dialect, blobs, catalog, replicas, uploads, clock, same_failures
        )
        self._servers = Servers(db)
        self._hooks = HookWork(db, catalog, replicas)
        self._tokens = Tokens(db)
        self._batch_control = BatchControl(db, clock)
        self._checkpoints = Checkpoints(db, blobs)
        self._clock = clock

    def schema_version(self) -> int:
        return self.database.schema_version()

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ apps

    def add_app(
        self,
        name: str,
        kind: AppKind | str,
        code: CodeSource,
        *,
        size: int | None = None,
        validator: str | None = None,
        assimilator: str | None = None,
    ) -> App:
        return self._catalog.add_app(
            name, kind, code, size=size, validator=validator, assimilator=assimilator
        )

    # ------------------------------------------------------------------ operator hooks

    def due_validations(self, now: float, limit: int) -> list[ValidationDue]:
        return self._hooks.due_validations(now, limit)

    def record_verdicts(self, job_id: int, verdicts: Sequence[PairVerdict], now: float) -> JobState:
        return self._hooks.record_verdicts(job_id, verdicts, now)

    def due_assimilations(self, now: float, limit: int) -> list[AssimilationDue]:
        return self._hooks.due_assimilations(now, limit)

    def assimilated(self, job_id: int, now: float) -> None:
        self._hooks.assimilated(job_id, now)

    def assimilation_failed(self, job_id: int, error: str, retry_at: float) -> None:
        self._hooks.assimilation_failed(job_id, error, retry_at)

    def hook_failures(self, limit: int = 20) -> list[HookFailure]:
        return self._hooks.failures(limit)

    def retire_app(self, name: str, version: int) -> App:
        return self._catalog.retire_app(name, version)

    def get_app(self, name: str, version: int | None = None) -> App:
        return self._catalog.get_app(name, version)

    def get_app_by_id(self, app_id: int) -> App:
        return self._catalog.get_app_by_id(app_id)

    def list_apps(self) -> list[App]:
        return self._catalog.list_apps()

    def open_code(self, app_id: int) -> BlobReader:
        return self._catalog.open_code(app_id)

    def read_code_chunk(self, app_id: int, offset: int, n: int) -> bytes:
        return self._catalog.read_code_chunk(app_id, offset, n)

    # ------------------------------------------------------------------ batches and jobs

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
    ) -> int:
        return self._catalog.create_batch(
            app_name,
            inputs,
            app_version=app_version,
            replicas=replicas,
            quorum=quorum,
            max_attempts=max_attempts,
            cpu_seconds=cpu_seconds,
            memory_bytes=memory_bytes,
            wall_seconds=wall_seconds,
            output_bytes=output_bytes,
            disk_bytes=disk_bytes,
            deadline=deadline,
        )

    def cancel_batch(self, batch_id: int) -> int:
        return self._batch_control.cancel(batch_id)

    def retry_failed(self, batch_id: int) -> tuple[int | None, list[int]]:
        failed = self._batch_control.failed_jobs(batch_id)
        if not failed:
            return None, []
        batch = self.get_batch(batch_id)
        ids = [job_id for _, job_id in failed]
        spooled = SpooledInputs(
            ids, self.read_input_chunk, lambda job_id: self.get_job(job_id).input_size
        )
        try:
            lim = batch.limits
            new = self.create_batch(
                batch.app.name,
                spooled.inputs(),
                app_version=batch.app.version,
                replicas=batch.replicas,
                quorum=batch.quorum,
                max_attempts=batch.max_attempts,
                cpu_seconds=lim.cpu_seconds,
                memory_bytes=lim.memory_bytes,
                wall_seconds=lim.wall_seconds,
                output_bytes=lim.output_bytes,
                disk_bytes=lim.disk_bytes,
            )
        finally:
            spooled.close()
        return new, [index for index, _ in failed]

    def get_batch(self, batch_id: int) -> Batch:
        return self._catalog.get_batch(batch_id)

    def newest_batch_id(self) -> int:
        return self._catalog.newest_batch_id()

    def list_batches(self) -> list[Batch]:
        return self._catalog.list_batches()

    def get_job(self, job_id: int) -> Job:
        return self._catalog.get_job(job_id)

    def failed_jobs(self, batch_id: int, limit: int = 10) -> list[Job]:
        return self._catalog.failed_jobs(batch_id, limit)

    def get_job_by_index(self, batch_id: int, index: int) -> Job:
        return self._catalog.get_job_by_index(batch_id, index)

    def list_attempts(self, job_id: int) -> list[AttemptRecord]:
        return self._catalog.list_attempts(job_id)

    def open_input(self, job_id: int) -> BlobReader:
        return self._catalog.open_input(job_id)

    def read_input_chunk(self, job_id: int, offset: int, n: int) -> bytes:
        return self._catalog.read_input_chunk(job_id, offset, n)

    # ------------------------------------------------------------------ leasing

    def lease_next(self, agent_id: str, now: float, lease_seconds: float) -> Lease | None:
        return self._leases.lease_many([LeaseRequest(agent_id, now, lease_seconds)])[0]

    def lease_many(self, requests: Sequence[LeaseRequest]) -> list[Lease | None]:
        return self._leases.lease_many(requests)

    def renew_lease(
        self,
        job_id: int,
        attempt: int,
        now: float,
        lease_seconds: float,
        *,
        transfer_seconds: float = DEFAULT_TRANSFER_SECONDS,
    ) -> float | None:
        return self._leases.renew(job_id, attempt, now, lease_seconds, transfer_seconds)

    def release_lease(
        self, job_id: int, attempt: int, reason: str, *, now: float | None = None
    ) -> bool:
        return self._leases.release(job_id, attempt, reason, now)

    def refuse_lease(
        self,
        job_id: int,
        attempt: int,
        agent_id: str,
        reason: str,
        *,
        now: float,
        offer_again: bool = False,
    ) -> int | None:
        return self._leases.refuse(job_id, attempt, agent_id, reason, now, offer_again)

    def expire_leases(self, now: float) -> list[ExpiredLease]:
        return self._leases.expire(now)

    def release_orphaned_leases(self, now: float, silent_since: float) -> list[ExpiredLease]:
        return self._leases.release_orphans(now, silent_since)

    # ------------------------------------------------------------------ servers

    def server_alive(self, server_id: str, address: str, now: float) -> None:
        self._servers.alive(server_id, address, now)

    def list_servers(self) -> list[tuple[str, str, float, float]]:
        return self._servers.list()

    # ------------------------------------------------------------------ results

    # ---- uploaded checkpoints --------------------------------------------------

    def save_checkpoint(
        self,
        job_id: int,
        attempt: int,
        agent_id: str,
        data: bytes,
        *,
        max_bytes: int = MAX_CHECKPOINT_BYTES,
    ) -> None:
        self._checkpoints.save(job_id, attempt, agent_id, data, self._clock(), max_bytes=max_bytes)

    def latest_checkpoint(self, job_id: int) -> StoredCheckpoint | None:
        return self._checkpoints.latest(job_id)

    def open_checkpoint(self, job_id: int) -> tuple[int, BlobReader] | None:
        return self._checkpoints.open_latest(job_id)

    def drop_finished_checkpoints(self, limit: int = 1000) -> int:
        return self._checkpoints.drop_finished(limit)

    # ---- API tokens ------------------------------------------------------------

    def create_token(self, name: str, scope: str, token_sha256: bytes) -> ApiToken:
        return self._tokens.create(name, scope, token_sha256, self._clock())

    def find_token(self, token_sha256: bytes) -> ApiToken | None:
        return self._tokens.find(token_sha256)

    def list_tokens(self) -> list[ApiToken]:
        return self._tokens.list()

    def revoke_token(self, name: str) -> None:
        self._tokens.revoke(name, self._clock())

    def attempt_owner(self, job_id: int, attempt: int) -> tuple[str, int] | None:
        return self._uploads.attempt_owner(job_id, attempt)

    def begin_result_upload(self, job_id: int, attempt: int, total: int) -> UploadHandle:
        return self._uploads.begin_result_upload(job_id, attempt, total)

    def write_result_chunk(
        self, handle: UploadHandle, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        self._uploads.write_result_chunk(handle, offset, data)

    def finish_upload(self, handle: UploadHandle, output_sha256: bytes) -> None:
        self._uploads.finish_upload(handle, output_sha256)

    def discard_upload(self, handle: UploadHandle) -> None:
        self._uploads.discard_upload(handle)

    def discard_stale_uploads(self, before: float) -> int:
        return self._uploads.discard_stale_uploads(before)

    def record_results(self, results: Sequence[ResultSubmission]) -> list[RecordOutcome]:
        return self._results.record(results)

    def result_exists(self, job_id: int, attempt: int) -> bool:
        return self._results.exists(job_id, attempt)

    def list_results(self, job_id: int) -> list[StoredResult]:
        return self._results.list(job_id)

    def open_output(self, job_id: int, attempt: int) -> BlobReader:
        return self._results.open_output(job_id, attempt)

    def iter_results(self, batch_id: int) -> Iterator[ResultRecord]:
        return self._results.iterate(batch_id)

    # ------------------------------------------------------------------ agents

    def enroll_agent(self, agent_id: str, ak_public_pem: str, name: str) -> AgentRecord:
        return self._agents.enroll_agent(agent_id, ak_public_pem, name)

    def get_agent(self, agent_id: str) -> AgentRecord:
        return self._agents.get_agent(agent_id)

    def find_agent(self, agent_id: str) -> AgentRecord | None:
        return self._agents.find_agent(agent_id)

    def list_agents(self) -> list[AgentRecord]:
        return self._agents.list_agents()

    def revoke_agent(self, agent_id: str) -> AgentRecord:
        return self._agents.revoke(agent_id, self._clock())

    def agent_credit(self) -> dict[str, AgentCredit]:
        return self._agents.credit()

    def set_agent_clock(
        self, agent_id: str, clock: int, reset_count: int, restart_count: int
    ) -> None:
        self._agents.set_agent_clock(agent_id, clock, reset_count, restart_count)

    def get_agent_clock(self, agent_id: str) -> AgentClock | None:
        return self._agents.get_agent_clock(agent_id)

    def touch_agent(self, agent_id: str, now: float, address: str | None) -> None:
        self._agents.touch_agent(agent_id, now, address)

    def allow_measurement(self, text: str, note: str = "") -> Measurement:
        return self._agents.allow_measurement(text, note)

    def list_measurements(self) -> list[Measurement]:
        return self._agents.list_measurements()

    def is_measurement_allowed(self, text: str) -> bool:
        return self._agents.is_measurement_allowed(text)

    def remove_measurement(self, text: str) -> None:
        self._agents.remove_measurement(text)

    def request_reset(self, agent_id: str) -> None:
        self._agents.request_reset(agent_id)

    def reset_requests_after(self, after: int) -> list[tuple[int, str]]:
        return self._agents.reset_requests_after(after)

    def newest_reset_request(self) -> int:
        return self._agents.newest_reset_request()

    def prune_reset_requests(self, before: float) -> int:
        return self._agents.prune_reset_requests(before)

    # ------------------------------------------------------------------ status

    def status(self) -> StoreStatus:
        return self._catalog.status()

    def batch_status(self, batch_id: int) -> BatchStatus:
        return self._catalog.batch_status(batch_id)

    def recent_failures(self, limit: int) -> list[FailedJob]:
        return self._catalog.recent_failures(limit)

    def queued_by_app(self) -> dict[str, int]:
        return self._catalog.queued_by_app()


def _conforms(store: SqlStore) -> Store:
    """Never called: makes mypy prove that SqlStore implements the Store protocol."""
    return store
