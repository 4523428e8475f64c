"""The embedded job store: SQLite in WAL mode behind the :class:`~vcomp.server.store.Store` API.

Thread rules
    ``SqliteStore`` may be shared by threads: each thread transparently gets its own
    connection (thread-local), and no connection is ever used by two threads. Write
    transactions start with ``BEGIN IMMEDIATE`` so writers queue on SQLite's lock (with
    a busy timeout) instead of failing when a read transaction tries to upgrade. WAL
    lets readers (e.g. the event loop streaming CODE chunks) run while one writer (the
    :class:`~vcomp.server.commit.GroupCommitter` thread) commits. Blob readers open the
    blob per read on the calling thread's connection, so they are not tied to a thread
    and never pin a snapshot between reads. ``close()`` closes every connection; call it
    once no thread uses the store any more.

Durability
    In WAL mode ``synchronous=NORMAL`` appends a commit to the WAL without fsync and syncs
    only at checkpoints. That survives a crash of this process (the bytes are in the OS
    page cache) but a power cut or kernel crash may drop the latest commits. An
    acknowledged result lets the agent delete its spooled copy, so a dropped commit would
    be a lost result: results, leases and everything the CLI writes commit with
    ``synchronous=FULL``, which fsyncs the WAL at every commit. Group commit (commit.py)
    shares that fsync among many results. Writes whose loss is harmless (staged upload
    chunks, lease renewals, last-seen times, TPM clock snapshots, taking reset requests)
    use NORMAL; the next FULL commit syncs the WAL file and with it everything written
    before, since the WAL is one append-only file.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from types import TracebackType
from typing import BinaryIO

from vcomp.errors import StoreError
from vcomp.server.store import (
    RESULT_OK,
    AgentClock,
    AgentRecord,
    App,
    AppKind,
    AttemptRecord,
    AttemptState,
    Batch,
    BatchStatus,
    CandidateResult,
    CodeSource,
    ExpiredLease,
    Job,
    JobLimits,
    JobState,
    Lease,
    LeaseRequest,
    Measurement,
    OutcomeKind,
    RecordOutcome,
    ResultComparator,
    ResultRecord,
    ResultSubmission,
    Store,
    StoredResult,
    StoreStatus,
    UploadHandle,
    group_results,
    is_disagreement,
    judge,
    sha256_equal,
)
from vcomp.server.store_sqlite_schema import (
    AGENT_SELECT,
    APP_SELECT,
    COPY_CHUNK,
    INLINE_OUTPUT_MAX,
    JOB_SELECT,
    LEASE_PICK,
    MAX_ATTEMPTS,
    MAX_BLOB_BYTES,
    MAX_READ_BYTES,
    MAX_REPLICAS,
    MAX_TEXT,
    MIGRATIONS,
    READ_AHEAD,
    RESULT_SELECT,
    RESULTS_PAGE,
    SCHEMA_VERSION,
    U64,
    agent_from_row,
    app_from_row,
    check_agent_id,
    check_finite,
    check_int,
    check_name,
    check_positive,
    check_size,
    check_submission,
    check_text,
    job_from_row,
    result_from_row,
    rowid,
    spki_der,
    stream_remaining,
)

__all__ = ["INLINE_OUTPUT_MAX", "MAX_BLOB_BYTES", "SCHEMA_VERSION", "SqliteStore"]


class _Rejected(Exception):
    """A submission that is not recorded; side effects so far (discarding) are kept."""

    def __init__(self, detail: str, job_state: JobState | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.job_state = job_state


class SqliteStore:
    """The SQLite job store. See the module docstring for thread and durability rules."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        comparator: ResultComparator = sha256_equal,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise StoreError("the job store needs a file path (WAL does not work in memory)")
        self._comparator = comparator
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # Apps and batches never change once written, so every thread may share these.
        self._apps: dict[int, App] = {}
        self._batches: dict[int, Batch] = {}
        self._migrate()

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed")
            try:
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # only so close() may close it; see thread rules
                )
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.close()
                    raise StoreError(f"{self._path}: cannot use WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_size_limit=67108864")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open job store {self._path}: {exc}") from exc
            self._connections.append(conn)
        self._local.conn = conn
        self._local.durable = True
        return conn

    @contextmanager
    def _txn(self, *, write: bool = False, durable: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            if write and self._local.durable != durable:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._local.durable = durable
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise StoreError(f"job store unavailable: {exc}") from exc
        try:
            yield conn
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"job store error: {exc}") from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(f"job store commit failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._txn(write=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"job store schema v{current} is newer than this vcomp (v{SCHEMA_VERSION})"
                )
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )

    def schema_version(self) -> int:
        with self._txn() as conn:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def journal_mode(self) -> str:
        with self._txn() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                with suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> SqliteStore:
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
        self, name: str, kind: AppKind | str, code: CodeSource, *, size: int | None = None
    ) -> App:
        name = check_name(name, "app name")
        try:
            app_kind = AppKind(kind)
        except ValueError:
            raise StoreError(f"app kind must be 'python' or 'exec', not {kind!r}") from None
        with ExitStack() as stack:
            if isinstance(code, str | os.PathLike):
                try:
                    stream: BinaryIO = stack.enter_context(open(code, "rb"))
                    total = os.fstat(stream.fileno()).st_size
                except OSError as exc:
                    raise StoreError(f"cannot read app code: {exc}") from exc
                if size is not None and size != total:
                    raise StoreError(f"app code is {total} bytes, not the {size} declared")
            else:
                stream = code
                total = size if size is not None else stream_remaining(stream)
            check_size(total, "app code")
            with self._txn(write=True) as conn:
                blob_id, digest = self._stream_into_blob(conn, stream, total)
                version = int(
                    conn.execute(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM apps WHERE name = ?", (name,)
                    ).fetchone()[0]
                )
                created = self._clock()
                cur = conn.execute(
                    "INSERT INTO apps (name, version, kind, blob_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, version, app_kind.value, blob_id, created),
                )
                app_id = rowid(cur)
        return App(app_id, name, version, app_kind, total, digest, created)

    def _stream_into_blob(
        self, conn: sqlite3.Connection, stream: BinaryIO, total: int
    ) -> tuple[int, bytes]:
        # zeroblob reserves the space without materialising it; blobopen fills it in
        # chunks, so the file is never in memory whole.
        cur = conn.execute(
            "INSERT INTO blobs (size, sha256, data) VALUES (?, NULL, zeroblob(?))", (total, total)
        )
        blob_id = rowid(cur)
        hasher = hashlib.sha256()
        written = 0
        try:
            with conn.blobopen("blobs", "data", blob_id) as blob:
                while written < total:
                    chunk = stream.read(min(COPY_CHUNK, total - written))
                    if not chunk:
                        raise StoreError(f"code stream ended after {written} of {total} bytes")
                    blob.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
            if stream.read(1):
                raise StoreError(f"code stream is longer than the {total} bytes declared")
        except OSError as exc:
            raise StoreError(f"cannot read app code: {exc}") from exc
        digest = hasher.digest()
        conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))
        return blob_id, digest

    def get_app(self, name: str, version: int | None = None) -> App:
        with self._txn() as conn:
            if version is None:
                row = conn.execute(
                    APP_SELECT + " WHERE a.name = ? ORDER BY a.version DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = conn.execute(
                    APP_SELECT + " WHERE a.name = ? AND a.version = ?",
                    (name, version),
                ).fetchone()
        if row is None:
            which = name if version is None else f"{name} v{version}"
            raise StoreError(f"unknown app {which!r}")
        return app_from_row(row)

    def get_app_by_id(self, app_id: int) -> App:
        with self._txn() as conn:
            return self._app(conn, app_id)

    def _app(self, conn: sqlite3.Connection, app_id: int) -> App:
        app = self._apps.get(app_id)
        if app is None:
            row = conn.execute(APP_SELECT + " WHERE a.id = ?", (app_id,)).fetchone()
            if row is None:
                raise StoreError(f"unknown app id {app_id}")
            app = self._apps[app_id] = app_from_row(row)
        return app

    def list_apps(self) -> list[App]:
        with self._txn() as conn:
            rows = conn.execute(APP_SELECT + " ORDER BY a.name, a.version").fetchall()
        return [app_from_row(row) for row in rows]

    def open_code(self, app_id: int) -> _BlobReader:
        with self._txn() as conn:
            row = conn.execute(
                "SELECT b.id, b.size, b.sha256 FROM apps AS a JOIN blobs AS b ON b.id = a.blob_id "
                "WHERE a.id = ?",
                (app_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown app id {app_id}")
        return _BlobReader(self, int(row[0]), int(row[1]), bytes(row[2]))

    def read_code_chunk(self, app_id: int, offset: int, n: int) -> bytes:
        with self.open_code(app_id) as reader:
            return reader.read(offset, n)

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
        deadline: float | None = None,
    ) -> int:
        quorum = replicas if quorum is None else quorum
        check_int(replicas, "replicas", 1, MAX_REPLICAS)
        check_int(quorum, "quorum", 1, replicas)
        check_int(max_attempts, "max_attempts", 1, MAX_ATTEMPTS)
        check_positive(cpu_seconds, "cpu_seconds")
        check_positive(wall_seconds, "wall_seconds")
        check_int(memory_bytes, "memory_bytes", 1, U64)
        check_int(output_bytes, "output_bytes", 0, MAX_BLOB_BYTES)
        if deadline is not None:
            check_positive(deadline, "deadline")
        app = self.get_app(app_name, app_version)
        with self._txn(write=True) as conn:
            cur = conn.execute(
                "INSERT INTO batches (app_id, created_at, n_jobs, replicas, quorum, max_attempts, "
                "cpu_seconds, memory_bytes, wall_seconds, output_bytes, deadline) "
                "VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    app.app_id,
                    self._clock(),
                    replicas,
                    quorum,
                    max_attempts,
                    float(cpu_seconds),
                    memory_bytes,
                    float(wall_seconds),
                    output_bytes,
                    deadline,
                ),
            )
            batch_id = rowid(cur)
            count = 0
            for index, data in enumerate(inputs):
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise StoreError(f"input {index} is {type(data).__name__}, not bytes")
                data = bytes(data)
                check_size(len(data), f"input {index}")
                blob = conn.execute(
                    "INSERT INTO blobs (size, sha256, data) VALUES (?, ?, ?)",
                    (len(data), hashlib.sha256(data).digest(), data),
                )
                conn.execute(
                    "INSERT INTO jobs (batch_id, idx, input_blob, state, pending, leased, "
                    "attempts) VALUES (?, ?, ?, 'queued', ?, 0, 0)",
                    (batch_id, index, rowid(blob), replicas),
                )
                count += 1
            if count == 0:
                raise StoreError("a batch needs at least one input")
            conn.execute("UPDATE batches SET n_jobs = ? WHERE id = ?", (count, batch_id))
        return batch_id

    def get_batch(self, batch_id: int) -> Batch:
        with self._txn() as conn:
            return self._batch(conn, batch_id)

    def _batch(self, conn: sqlite3.Connection, batch_id: int) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            row = conn.execute(
                "SELECT id, app_id, created_at, n_jobs, replicas, quorum, max_attempts, "
                "cpu_seconds, memory_bytes, wall_seconds, output_bytes, deadline "
                "FROM batches WHERE id = ?",
                (batch_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown batch {batch_id}")
            batch = Batch(
                batch_id=int(row[0]),
                app=self._app(conn, int(row[1])),
                created_at=float(row[2]),
                n_jobs=int(row[3]),
                replicas=int(row[4]),
                quorum=int(row[5]),
                max_attempts=int(row[6]),
                limits=JobLimits(float(row[7]), int(row[8]), float(row[9]), int(row[10])),
                deadline=None if row[11] is None else float(row[11]),
            )
            if batch.n_jobs > 0:  # not mid-creation: safe to cache
                self._batches[batch_id] = batch
        return batch

    def list_batches(self) -> list[Batch]:
        with self._txn() as conn:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM batches ORDER BY id")]
            return [self._batch(conn, batch_id) for batch_id in ids]

    def get_job(self, job_id: int) -> Job:
        with self._txn() as conn:
            row = conn.execute(
                JOB_SELECT + " WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown job {job_id}")
        return job_from_row(row)

    def get_job_by_index(self, batch_id: int, index: int) -> Job:
        with self._txn() as conn:
            row = conn.execute(
                JOB_SELECT + " WHERE j.batch_id = ? AND j.idx = ?",
                (batch_id, index),
            ).fetchone()
        if row is None:
            raise StoreError(f"batch {batch_id} has no job {index}")
        return job_from_row(row)

    def list_attempts(self, job_id: int) -> list[AttemptRecord]:
        with self._txn() as conn:
            rows = conn.execute(
                "SELECT job_id, attempt, agent_id, state, leased_at, deadline, ended_at, reason "
                "FROM attempts WHERE job_id = ? ORDER BY attempt",
                (job_id,),
            ).fetchall()
        return [
            AttemptRecord(
                int(r[0]),
                int(r[1]),
                str(r[2]),
                AttemptState(r[3]),
                float(r[4]),
                float(r[5]),
                None if r[6] is None else float(r[6]),
                None if r[7] is None else str(r[7]),
            )
            for r in rows
        ]

    def open_input(self, job_id: int) -> _BlobReader:
        with self._txn() as conn:
            row = conn.execute(
                "SELECT b.id, b.size, b.sha256 FROM jobs AS j JOIN blobs AS b "
                "ON b.id = j.input_blob WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown job {job_id}")
        return _BlobReader(self, int(row[0]), int(row[1]), bytes(row[2]))

    def read_input_chunk(self, job_id: int, offset: int, n: int) -> bytes:
        with self.open_input(job_id) as reader:
            return reader.read(offset, n)

    # ------------------------------------------------------------------ leasing

    def lease_next(self, agent_id: str, now: float, lease_seconds: float) -> Lease | None:
        return self.lease_many([LeaseRequest(agent_id, now, lease_seconds)])[0]

    def lease_many(self, requests: Sequence[LeaseRequest]) -> list[Lease | None]:
        """Serve several lease requests in one transaction (one fsync)."""
        for request in requests:
            check_finite(request.now, "now")
            check_positive(request.lease_seconds, "lease_seconds")
        if not requests:
            return []
        with self._txn(write=True) as conn:
            return [self._lease_one(conn, request) for request in requests]

    def _lease_one(self, conn: sqlite3.Connection, request: LeaseRequest) -> Lease | None:
        agent_id = self._known_agent(conn, request.agent_id)
        row = conn.execute(LEASE_PICK, (request.now, agent_id)).fetchone()
        if row is None:
            return None
        job_id, batch_id, index, pending = int(row[0]), int(row[1]), int(row[2]), int(row[3])
        attempt = int(row[4]) + 1
        deadline = float(request.now + request.lease_seconds)
        state = JobState.QUEUED if pending > 1 else JobState.LEASED
        conn.execute(
            "UPDATE jobs SET pending = pending - 1, leased = leased + 1, attempts = ?, state = ? "
            "WHERE id = ?",
            (attempt, state.value, job_id),
        )
        conn.execute(
            "INSERT INTO attempts (job_id, attempt, agent_id, state, leased_at, deadline) "
            "VALUES (?, ?, ?, 'leased', ?, ?)",
            (job_id, attempt, agent_id, request.now, deadline),
        )
        batch = self._batch(conn, batch_id)
        return Lease(
            job_id=job_id,
            attempt=attempt,
            agent_id=agent_id,
            batch_id=batch_id,
            index=index,
            app=batch.app,
            input_size=int(row[5]),
            input_sha256=bytes(row[6]),
            limits=batch.limits,
            deadline=deadline,
            batch_deadline=batch.deadline,
        )

    def renew_lease(
        self, job_id: int, attempt: int, now: float, lease_seconds: float
    ) -> float | None:
        """Extend a live lease; ``None`` if the attempt is no longer the live lease."""
        check_finite(now, "now")
        check_positive(lease_seconds, "lease_seconds")
        with self._txn(write=True, durable=False) as conn:
            attempt_state, job_state, _ = self._attempt_row(conn, job_id, attempt)
            if attempt_state is not AttemptState.LEASED or job_state.terminal:
                return None
            deadline = now + lease_seconds
            conn.execute(
                "UPDATE attempts SET deadline = ? WHERE job_id = ? AND attempt = ?",
                (deadline, job_id, attempt),
            )
            return deadline

    def release_lease(
        self, job_id: int, attempt: int, reason: str, *, now: float | None = None
    ) -> bool:
        """Hand a lease back (RESET, shutdown, transfer failed): requeue it at once.

        The attempt counts against the budget. Returns False for a stale attempt.
        """
        reason = check_text(reason, "reason")
        when = self._clock() if now is None else now
        with self._txn(write=True) as conn:
            attempt_state, job_state, _ = self._attempt_row(conn, job_id, attempt)
            if attempt_state is not AttemptState.LEASED:
                return False
            self._end_attempt(conn, job_id, attempt, AttemptState.RELEASED, when, reason)
            if not job_state.terminal:
                self._fail_attempt(conn, job_id, f"released: {reason}", when)
            return True

    def expire_leases(self, now: float) -> list[ExpiredLease]:
        """Requeue (or fail) every lease whose deadline has passed; fail jobs of
        batches whose deadline has passed."""
        check_finite(now, "now")
        expired: list[ExpiredLease] = []
        with self._txn(write=True) as conn:
            rows = conn.execute(
                "SELECT a.job_id, a.attempt, a.agent_id, j.state FROM attempts AS a "
                "JOIN jobs AS j ON j.id = a.job_id "
                "WHERE a.state = 'leased' AND a.deadline <= ? ORDER BY a.deadline",
                (now,),
            ).fetchall()
            for job_id, attempt, agent_id, state in rows:
                self._end_attempt(conn, job_id, attempt, AttemptState.EXPIRED, now, "lease expired")
                job_state = JobState(state)
                if not job_state.terminal:
                    job_state = self._fail_attempt(conn, job_id, "lease expired", now)
                expired.append(ExpiredLease(int(job_id), int(attempt), str(agent_id), job_state))
            conn.execute(
                "UPDATE jobs SET state = 'failed', pending = 0, reason = 'batch deadline passed', "
                "finished_at = ? WHERE state IN ('queued', 'leased') AND batch_id IN "
                "(SELECT id FROM batches WHERE deadline IS NOT NULL AND deadline <= ?)",
                (now, now),
            )
        return expired

    def _attempt_row(
        self, conn: sqlite3.Connection, job_id: int, attempt: int
    ) -> tuple[AttemptState, JobState, str]:
        row = conn.execute(
            "SELECT a.state, j.state, a.agent_id FROM attempts AS a JOIN jobs AS j "
            "ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?",
            (job_id, attempt),
        ).fetchone()
        if row is None:
            raise StoreError(f"job {job_id} has no attempt {attempt}")
        return AttemptState(row[0]), JobState(row[1]), str(row[2])

    @staticmethod
    def _end_attempt(
        conn: sqlite3.Connection,
        job_id: int,
        attempt: int,
        state: AttemptState,
        when: float,
        reason: str | None,
    ) -> None:
        conn.execute(
            "UPDATE attempts SET state = ?, ended_at = ?, reason = ? "
            "WHERE job_id = ? AND attempt = ?",
            (state.value, when, reason, job_id, attempt),
        )

    def _fail_attempt(
        self, conn: sqlite3.Connection, job_id: int, reason: str, now: float
    ) -> JobState:
        """A live job lost one leased replica: note why and let _settle requeue or fail."""
        conn.execute(
            "UPDATE jobs SET leased = leased - 1, reason = ? WHERE id = ?", (reason, job_id)
        )
        return self._settle(conn, job_id, now)

    # ------------------------------------------------------------------ replication

    def _settle(
        self, conn: sqlite3.Connection, job_id: int, now: float, new_attempt: int | None = None
    ) -> JobState:
        """Bring a live job's state in line with its results, leases and budget."""
        row = conn.execute(
            "SELECT state, batch_id, pending, leased, attempts, reason FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        state = JobState(row[0])
        if state.terminal:
            return state
        batch = self._batch(conn, int(row[1]))
        groups = group_results(self._candidates(conn, job_id), self._comparator, batch.quorum)
        if new_attempt is not None and is_disagreement(groups, new_attempt):
            conn.execute(
                "INSERT INTO disagreements (job_id, attempt, groups, detected_at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, new_attempt, len(groups), now),
            )
            conn.execute(
                "UPDATE jobs SET disagreements = disagreements + 1 WHERE id = ?", (job_id,)
            )
        verdict = judge(
            groups,
            quorum=batch.quorum,
            budget=batch.attempt_budget,
            pending=int(row[2]),
            leased=int(row[3]),
            attempts=int(row[4]),
            last_failure=row[5],
        )
        if verdict.state is JobState.DONE:
            conn.execute(
                "UPDATE jobs SET state = 'done', pending = 0, canonical_attempt = ?, "
                "reason = NULL, finished_at = ? WHERE id = ?",
                (verdict.canonical_attempt, now, job_id),
            )
        elif verdict.state is JobState.FAILED:
            conn.execute(
                "UPDATE jobs SET state = 'failed', pending = 0, reason = ?, finished_at = ? "
                "WHERE id = ?",
                (verdict.reason, now, job_id),
            )
        else:
            conn.execute(
                "UPDATE jobs SET state = ?, pending = ? WHERE id = ?",
                (verdict.state.value, verdict.pending, job_id),
            )
        return verdict.state

    def _candidates(self, conn: sqlite3.Connection, job_id: int) -> list[CandidateResult]:
        rows = conn.execute(
            "SELECT attempt, agent_id, output_size, output_sha256, output_blob FROM results "
            "WHERE job_id = ? AND counted = 1 AND status = ? ORDER BY attempt",
            (job_id, RESULT_OK),
        ).fetchall()
        return [
            CandidateResult(
                job_id=job_id,
                attempt=int(r[0]),
                agent_id=str(r[1]),
                output_size=int(r[2]),
                output_sha256=bytes(r[3]),
                read=self._loader(r[4], int(r[2])),
            )
            for r in rows
        ]

    def _loader(self, blob_id: int | None, size: int) -> Callable[[], bytes]:
        def load() -> bytes:
            if blob_id is None:
                return b""
            with _BlobReader(self, blob_id, size, b"") as reader:
                return reader.read(0, size)

        return load

    # ------------------------------------------------------------------ results

    def begin_result_upload(self, job_id: int, attempt: int, total: int) -> UploadHandle:
        """Reserve a staging blob of ``total`` bytes for a large result."""
        check_size(total, "result upload")
        with self._txn(write=True, durable=False) as conn:
            row = conn.execute(
                "SELECT j.batch_id FROM attempts AS a JOIN jobs AS j ON j.id = a.job_id "
                "WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} has no attempt {attempt}")
            limit = self._batch(conn, int(row[0])).limits.output_bytes
            if total > limit:
                raise StoreError(f"result of {total} bytes exceeds the job's limit of {limit}")
            blob = conn.execute(
                "INSERT INTO blobs (size, sha256, data) VALUES (?, NULL, zeroblob(?))",
                (total, total),
            )
            cur = conn.execute(
                "INSERT INTO uploads (job_id, attempt, blob_id, total, high_water, created_at) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                (job_id, attempt, rowid(blob), total, self._clock()),
            )
            return UploadHandle(rowid(cur), job_id, attempt, total)

    def write_result_chunk(
        self, handle: UploadHandle, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Write one range of a staged result. Coalescing small chunks is the caller's
        choice: each call is one (unsynced) transaction."""
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > handle.total:
            raise StoreError(
                f"chunk [{offset}, {offset + n}) is outside the {handle.total}-byte upload"
            )
        with self._txn(write=True, durable=False) as conn:
            blob_id, high_water, sealed = self._upload_row(conn, handle)
            if sealed is not None:
                raise StoreError(f"upload {handle.upload_id} is already finished")
            with conn.blobopen("blobs", "data", blob_id) as blob:
                blob.seek(offset)
                blob.write(data)
            if offset + n > high_water:
                conn.execute(
                    "UPDATE uploads SET high_water = ? WHERE id = ?", (offset + n, handle.upload_id)
                )

    def finish_upload(self, handle: UploadHandle, output_sha256: bytes) -> None:
        """Check a staged upload is complete and matches ``output_sha256``, then seal it.

        Optional but recommended before ``record_results``: the hashing happens here,
        outside any write transaction, so a 64 MiB result does not stall the group
        commit. A mismatch discards the upload and raises.
        """
        with self._txn() as conn:
            blob_id, high_water, _ = self._upload_row(conn, handle)
        if high_water != handle.total:
            raise StoreError(f"upload incomplete: {high_water} of {handle.total} bytes written")
        digest = self._hash_blob(blob_id, handle.total)
        with self._txn(write=True, durable=False) as conn:
            self._upload_row(conn, handle)  # still there?
            if digest != output_sha256:
                self._discard_upload(conn, handle.upload_id)
            else:
                conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))
        if digest != output_sha256:
            raise StoreError("sha256 mismatch on staged output; upload discarded")

    def _hash_blob(self, blob_id: int, size: int) -> bytes:
        hasher = hashlib.sha256()
        with _BlobReader(self, blob_id, size, b"") as reader:
            for offset in range(0, size, COPY_CHUNK):
                hasher.update(reader.read(offset, COPY_CHUNK))
        return hasher.digest()

    def discard_upload(self, handle: UploadHandle) -> None:
        with self._txn(write=True, durable=False) as conn:
            self._discard_upload(conn, handle.upload_id)

    def discard_stale_uploads(self, before: float) -> int:
        """Drop staged uploads begun before ``before`` (their senders are gone, e.g. after
        a server restart, since handles live only in the server's memory)."""
        with self._txn(write=True, durable=False) as conn:
            ids = [
                int(r[0])
                for r in conn.execute("SELECT id FROM uploads WHERE created_at < ?", (before,))
            ]
            for upload_id in ids:
                self._discard_upload(conn, upload_id)
        return len(ids)

    @staticmethod
    def _upload_row(
        conn: sqlite3.Connection, handle: UploadHandle
    ) -> tuple[int, int, bytes | None]:
        """(blob id, bytes written so far, SHA-256 once finish_upload verified it)."""
        row = conn.execute(
            "SELECT u.blob_id, u.high_water, u.job_id, u.attempt, u.total, b.sha256 "
            "FROM uploads AS u JOIN blobs AS b ON b.id = u.blob_id WHERE u.id = ?",
            (handle.upload_id,),
        ).fetchone()
        if row is None or (int(row[2]), int(row[3]), int(row[4])) != (
            handle.job_id,
            handle.attempt,
            handle.total,
        ):
            raise StoreError(f"unknown or finished upload {handle.upload_id}")
        return int(row[0]), int(row[1]), None if row[5] is None else bytes(row[5])

    @staticmethod
    def _discard_upload(conn: sqlite3.Connection, upload_id: int) -> None:
        row = conn.execute("SELECT blob_id FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            conn.execute("DELETE FROM blobs WHERE id = ?", (row[0],))

    def record_results(self, results: Sequence[ResultSubmission]) -> list[RecordOutcome]:
        """Record many results in ONE durable transaction (group commit).

        Per-result problems never abort the others: they come back as REJECTED outcomes.
        """
        if not results:
            return []
        outcomes: list[RecordOutcome] = []
        with self._txn(write=True) as conn:
            for sub in results:
                conn.execute("SAVEPOINT record_one")
                try:
                    outcome = self._record_one(conn, sub)
                except _Rejected as rejected:  # keep its cleanup (discarded upload)
                    outcome = RecordOutcome(
                        sub.job_id,
                        sub.attempt,
                        OutcomeKind.REJECTED,
                        rejected.job_state,
                        rejected.detail,
                    )
                except (StoreError, sqlite3.IntegrityError) as exc:
                    conn.execute("ROLLBACK TO record_one")
                    outcome = RecordOutcome(
                        sub.job_id, sub.attempt, OutcomeKind.REJECTED, None, str(exc)
                    )
                conn.execute("RELEASE record_one")
                outcomes.append(outcome)
        return outcomes

    def _record_one(self, conn: sqlite3.Connection, sub: ResultSubmission) -> RecordOutcome:
        check_submission(sub)
        upload_id = None if sub.upload is None else sub.upload.upload_id
        row = conn.execute(
            "SELECT a.agent_id, a.state, j.state, j.pending, j.batch_id FROM attempts AS a "
            "JOIN jobs AS j ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?",
            (sub.job_id, sub.attempt),
        ).fetchone()
        if row is None:
            self._discard_if(conn, upload_id)
            raise _Rejected(f"job {sub.job_id} has no attempt {sub.attempt}", None)
        job_state = JobState(row[2])
        if row[0] != sub.agent_id:
            self._discard_if(conn, upload_id)
            raise _Rejected(f"attempt {sub.attempt} was leased to another agent", job_state)
        previous = conn.execute(
            "SELECT output_sha256 FROM results WHERE job_id = ? AND attempt = ?",
            (sub.job_id, sub.attempt),
        ).fetchone()
        if previous is not None:
            self._discard_if(conn, upload_id)
            same = sub.output_sha256 is None or bytes(previous[0]) == sub.output_sha256
            detail = "already recorded" if same else "already recorded (first result kept)"
            return RecordOutcome(sub.job_id, sub.attempt, OutcomeKind.DUPLICATE, job_state, detail)

        batch = self._batch(conn, int(row[4]))
        status, error = sub.status, sub.error
        limit = batch.limits.output_bytes
        blob_id, size, digest = self._take_output(conn, sub, job_state, limit)
        if size > limit:  # inline output the sandbox should have stopped: a failed attempt
            status = "output_too_large"
            error = f"output of {size} bytes exceeds the limit of {limit}"
        ok = status == RESULT_OK
        attempt_state = AttemptState(row[1])
        if job_state.terminal:
            kind = OutcomeKind.EVIDENCE
        elif attempt_state is AttemptState.LEASED:
            kind = OutcomeKind.ACCEPTED
        elif (
            ok
            and attempt_state in (AttemptState.EXPIRED, AttemptState.RELEASED)
            and int(row[3]) > 0
            and not self._agent_holds(conn, sub.job_id, sub.agent_id)
        ):
            # The lease lapsed but its replacement was not handed out yet: the work is
            # still wanted, so count it rather than run the job again.
            kind = OutcomeKind.LATE
        else:
            kind = OutcomeKind.EVIDENCE
        counted = kind in (OutcomeKind.ACCEPTED, OutcomeKind.LATE)
        received = sub.received_at or self._clock()
        conn.execute(
            "INSERT INTO results (job_id, attempt, agent_id, status, error, output_size, "
            "output_sha256, cpu_ms, wall_ms, received_at, counted, output_blob) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sub.job_id,
                sub.attempt,
                sub.agent_id,
                status,
                error[:MAX_TEXT],
                size,
                digest,
                sub.cpu_ms,
                sub.wall_ms,
                received,
                int(counted),
                blob_id,
            ),
        )
        failure = None
        if not ok:
            failure = f"{status}: {error}"[:MAX_TEXT] if error else status
        if attempt_state is AttemptState.LEASED or kind is OutcomeKind.LATE:
            ended = AttemptState.SUCCEEDED if ok else AttemptState.ERRORED
            self._end_attempt(conn, sub.job_id, sub.attempt, ended, received, failure)
        if kind is OutcomeKind.ACCEPTED and not ok:
            job_state = self._fail_attempt(conn, sub.job_id, failure or status, received)
        elif counted:
            if kind is OutcomeKind.ACCEPTED:
                conn.execute("UPDATE jobs SET leased = leased - 1 WHERE id = ?", (sub.job_id,))
            else:  # LATE: the result fills a replica slot that was waiting for a lease
                conn.execute("UPDATE jobs SET pending = pending - 1 WHERE id = ?", (sub.job_id,))
            job_state = self._settle(conn, sub.job_id, received, new_attempt=sub.attempt)
        detail = "" if counted else f"job is {job_state.value}; kept as evidence"
        return RecordOutcome(sub.job_id, sub.attempt, kind, job_state, detail)

    def _take_output(
        self, conn: sqlite3.Connection, sub: ResultSubmission, job_state: JobState, limit: int
    ) -> tuple[int | None, int, bytes]:
        """Store the output: inline bytes into a new blob, or finalise a staged upload."""
        if sub.upload is None:
            data = sub.output or b""
            digest = hashlib.sha256(data).digest()
            if sub.output_size is not None and sub.output_size != len(data):
                raise _Rejected(
                    f"size mismatch: declared {sub.output_size}, got {len(data)}", job_state
                )
            if sub.output_sha256 is not None and sub.output_sha256 != digest:
                raise _Rejected("sha256 mismatch on inline output", job_state)
            if not data or len(data) > limit:  # nothing to keep, or too big to keep
                return None, len(data), digest
            cur = conn.execute(
                "INSERT INTO blobs (size, sha256, data) VALUES (?, ?, ?)",
                (len(data), digest, data),
            )
            return rowid(cur), len(data), digest
        handle = sub.upload
        try:
            blob_id, high_water, sealed = self._upload_row(conn, handle)
        except StoreError as exc:
            raise _Rejected(str(exc), job_state) from None
        if (handle.job_id, handle.attempt) != (sub.job_id, sub.attempt):
            raise _Rejected("upload belongs to another attempt", job_state)
        if sub.output_size is not None and sub.output_size != handle.total:
            self._discard_upload(conn, handle.upload_id)
            raise _Rejected(
                f"size mismatch: declared {sub.output_size}, staged {handle.total}", job_state
            )
        if high_water != handle.total:
            self._discard_upload(conn, handle.upload_id)
            raise _Rejected(
                f"upload incomplete: {high_water} of {handle.total} bytes written", job_state
            )
        # Hash now unless finish_upload already did (outside the write transaction).
        digest = sealed if sealed is not None else self._hash_blob(blob_id, handle.total)
        if digest != sub.output_sha256:
            self._discard_upload(conn, handle.upload_id)
            raise _Rejected("sha256 mismatch on staged output", job_state)
        # The staging blob becomes the result blob in place: no copy of the payload.
        conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))
        conn.execute("DELETE FROM uploads WHERE id = ?", (handle.upload_id,))
        return blob_id, handle.total, digest

    def _discard_if(self, conn: sqlite3.Connection, upload_id: int | None) -> None:
        if upload_id is not None:
            self._discard_upload(conn, upload_id)

    @staticmethod
    def _agent_holds(conn: sqlite3.Connection, job_id: int, agent_id: str) -> bool:
        """Does this agent hold a live lease or a counted ok result for this job?"""
        row = conn.execute(
            "SELECT 1 FROM attempts WHERE job_id = ? AND agent_id = ? "
            "AND state IN ('leased', 'succeeded') LIMIT 1",
            (job_id, agent_id),
        ).fetchone()
        return row is not None

    def result_exists(self, job_id: int, attempt: int) -> bool:
        with self._txn() as conn:
            row = conn.execute(
                "SELECT 1 FROM results WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
        return row is not None

    def list_results(self, job_id: int) -> list[StoredResult]:
        with self._txn() as conn:
            rows = conn.execute(
                RESULT_SELECT + " WHERE job_id = ? ORDER BY attempt", (job_id,)
            ).fetchall()
        return [result_from_row(r) for r in rows]

    def open_output(self, job_id: int, attempt: int) -> _BlobReader:
        with self._txn() as conn:
            row = conn.execute(
                "SELECT output_blob, output_size, output_sha256 FROM results "
                "WHERE job_id = ? AND attempt = ?",
                (job_id, attempt),
            ).fetchone()
        if row is None:
            raise StoreError(f"no result for job {job_id} attempt {attempt}")
        blob_id = None if row[0] is None else int(row[0])
        size = 0 if blob_id is None else int(row[1])
        return _BlobReader(self, blob_id, size, bytes(row[2]))

    def iter_results(self, batch_id: int) -> Iterator[ResultRecord]:
        """Yield every job of a batch in index order, with its canonical result.

        Reads a page at a time in short transactions, so no snapshot stays open while
        the caller writes files.
        """
        self.get_batch(batch_id)
        last = -1
        while True:
            with self._txn() as conn:
                rows = conn.execute(
                    "SELECT j.id, j.idx, bl.sha256, j.state, j.reason, j.canonical_attempt "
                    "FROM jobs AS j JOIN blobs AS bl ON bl.id = j.input_blob "
                    "WHERE j.batch_id = ? AND j.idx > ? ORDER BY j.idx LIMIT ?",
                    (batch_id, last, RESULTS_PAGE),
                ).fetchall()
                page = []
                for job_id, index, input_sha, state, reason, canonical in rows:
                    if canonical is not None:
                        result_row = conn.execute(
                            RESULT_SELECT + " WHERE job_id = ? AND attempt = ?",
                            (job_id, canonical),
                        ).fetchone()
                    else:
                        result_row = conn.execute(
                            RESULT_SELECT
                            + " WHERE job_id = ? AND counted = 1 ORDER BY attempt DESC LIMIT 1",
                            (job_id,),
                        ).fetchone()
                    page.append(
                        ResultRecord(
                            job_id=int(job_id),
                            index=int(index),
                            input_sha256=bytes(input_sha),
                            state=JobState(state),
                            reason=None if reason is None else str(reason),
                            result=None if result_row is None else result_from_row(result_row),
                        )
                    )
            if not page:
                return
            yield from page
            last = page[-1].index

    # ------------------------------------------------------------------ agents

    def enroll_agent(self, agent_id: str, ak_public_pem: str, name: str) -> AgentRecord:
        """Register an agent's attestation key. Re-enrolling the same key renames it."""
        agent_id = check_agent_id(agent_id)
        name = check_text(name, "agent name")
        der = spki_der(ak_public_pem)
        if hashlib.sha256(der).hexdigest() != agent_id:
            raise StoreError("agent id is not the SHA-256 of the attestation key's SPKI")
        with self._txn(write=True) as conn:
            conn.execute(
                "INSERT INTO agents (id, name, ak_public_pem, enrolled_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (agent_id, name, ak_public_pem.strip() + "\n", self._clock()),
            )
            return self._agent(conn, agent_id)

    def get_agent(self, agent_id: str) -> AgentRecord:
        agent = self.find_agent(agent_id)
        if agent is None:
            raise StoreError(f"unknown agent {agent_id[:16]}")
        return agent

    def find_agent(self, agent_id: str) -> AgentRecord | None:
        with self._txn() as conn:
            row = conn.execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        return None if row is None else agent_from_row(row)

    def _agent(self, conn: sqlite3.Connection, agent_id: str) -> AgentRecord:
        row = conn.execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown agent {agent_id[:16]}")
        return agent_from_row(row)

    @staticmethod
    def _known_agent(conn: sqlite3.Connection, agent_id: str) -> str:
        if conn.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is None:
            raise StoreError(f"unknown agent {str(agent_id)[:16]}")
        return agent_id

    def list_agents(self) -> list[AgentRecord]:
        with self._txn() as conn:
            rows = conn.execute(AGENT_SELECT + " ORDER BY name, id").fetchall()
        return [agent_from_row(r) for r in rows]

    def set_agent_clock(
        self, agent_id: str, clock: int, reset_count: int, restart_count: int
    ) -> None:
        check_int(clock, "clock", 0, U64)
        check_int(reset_count, "reset_count", 0, (1 << 32) - 1)
        check_int(restart_count, "restart_count", 0, (1 << 32) - 1)
        # SQLite integers are signed 64-bit; store the u64 clock as its signed twin.
        signed = clock - (1 << 64) if clock >= 1 << 63 else clock
        with self._txn(write=True, durable=False) as conn:
            cur = conn.execute(
                "UPDATE agents SET clock = ?, reset_count = ?, restart_count = ? WHERE id = ?",
                (signed, reset_count, restart_count, agent_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown agent {agent_id[:16]}")

    def get_agent_clock(self, agent_id: str) -> AgentClock | None:
        with self._txn() as conn:
            self._known_agent(conn, agent_id)
            row = conn.execute(
                "SELECT clock, reset_count, restart_count FROM agents WHERE id = ?", (agent_id,)
            ).fetchone()
        if row[0] is None:
            return None
        return AgentClock(int(row[0]) % (1 << 64), int(row[1]), int(row[2]))

    def touch_agent(self, agent_id: str, now: float, address: str | None) -> None:
        check_finite(now, "now")
        with self._txn(write=True, durable=False) as conn:
            cur = conn.execute(
                "UPDATE agents SET last_seen = ?, address = ? WHERE id = ?",
                (now, None if address is None else address[:MAX_TEXT], agent_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown agent {agent_id[:16]}")

    # ------------------------------------------------------------------ allowlist

    def allow_measurement(self, text: str, note: str = "") -> Measurement:
        text = check_text(text, "measurement")
        note = note[:MAX_TEXT]
        added = self._clock()
        with self._txn(write=True) as conn:
            conn.execute(
                "INSERT INTO measurements (text, note, added_at) VALUES (?, ?, ?) "
                "ON CONFLICT (text) DO UPDATE SET note = excluded.note",
                (text, note, added),
            )
            row = conn.execute(
                "SELECT text, note, added_at FROM measurements WHERE text = ?", (text,)
            ).fetchone()
        return Measurement(str(row[0]), str(row[1]), float(row[2]))

    def list_measurements(self) -> list[Measurement]:
        with self._txn() as conn:
            rows = conn.execute(
                "SELECT text, note, added_at FROM measurements ORDER BY added_at, text"
            ).fetchall()
        return [Measurement(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def is_measurement_allowed(self, text: str) -> bool:
        with self._txn() as conn:
            row = conn.execute("SELECT 1 FROM measurements WHERE text = ?", (text,)).fetchone()
        return row is not None

    def remove_measurement(self, text: str) -> None:
        with self._txn(write=True) as conn:
            if conn.execute("DELETE FROM measurements WHERE text = ?", (text,)).rowcount == 0:
                raise StoreError("no such measurement in the allowlist")

    # ------------------------------------------------------------------ reset requests

    def request_reset(self, agent_id: str) -> None:
        with self._txn(write=True) as conn:
            self._known_agent(conn, agent_id)
            conn.execute(
                "INSERT INTO reset_requests (agent_id, requested_at) VALUES (?, ?)",
                (agent_id, self._clock()),
            )

    def take_reset_requests(self) -> list[str]:
        with self._txn(write=True, durable=False) as conn:
            rows = conn.execute(
                "SELECT agent_id, MIN(id) FROM reset_requests GROUP BY agent_id ORDER BY 2"
            ).fetchall()
            conn.execute("DELETE FROM reset_requests")
        return [str(r[0]) for r in rows]

    # ------------------------------------------------------------------ status

    def status(self) -> StoreStatus:
        with self._txn() as conn:
            agents = int(conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0])
            jobs = dict.fromkeys(JobState, 0)
            for state, count in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                jobs[JobState(state)] = int(count)
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM batches ORDER BY id")]
            batches = tuple(self._batch_status(conn, batch_id) for batch_id in ids)
        return StoreStatus(agents, jobs, batches)

    def batch_status(self, batch_id: int) -> BatchStatus:
        with self._txn() as conn:
            return self._batch_status(conn, batch_id)

    def _batch_status(self, conn: sqlite3.Connection, batch_id: int) -> BatchStatus:
        batch = self._batch(conn, batch_id)
        counts = dict.fromkeys(JobState, 0)
        disagreements = 0
        for state, count, disagree in conn.execute(
            "SELECT state, COUNT(*), SUM(disagreements) FROM jobs WHERE batch_id = ? "
            "GROUP BY state",
            (batch_id,),
        ):
            counts[JobState(state)] = int(count)
            disagreements += int(disagree or 0)
        return BatchStatus(
            batch_id=batch_id,
            app_name=batch.app.name,
            app_version=batch.app.version,
            created_at=batch.created_at,
            deadline=batch.deadline,
            total=batch.n_jobs,
            queued=counts[JobState.QUEUED],
            leased=counts[JobState.LEASED],
            done=counts[JobState.DONE],
            failed=counts[JobState.FAILED],
            disagreements=disagreements,
        )


class _BlobReader:
    """Range reads of one stored blob, with a read-ahead window.

    The blob handle stays open between reads on the thread that opened it: SQLite
    walks a large blob's overflow-page chain from the start on every open, so
    reopening per window made a streamed transfer quadratic (2.5 ms per 64 KiB
    window at 16 MiB). Holding it keeps a read snapshot open in WAL mode, which
    blocks no writer; :meth:`close` releases it when the transfer ends.
    """

    def __init__(self, store: SqliteStore, blob_id: int | None, size: int, sha256: bytes) -> None:
        self._store = store
        self._blob_id = blob_id
        self._size = size
        self._sha256 = sha256
        self._window_start = 0
        self._window = b""
        self._handle: sqlite3.Blob | None = None
        self._handle_thread = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> bytes:
        return self._sha256

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset > self._size:
            raise StoreError(f"read [{offset}, +{n}) is outside a {self._size}-byte blob")
        if n > MAX_READ_BYTES:
            raise StoreError(f"read of {n} bytes exceeds the {MAX_READ_BYTES}-byte bound")
        n = min(n, self._size - offset)
        if n == 0 or self._blob_id is None:
            return b""
        start = offset - self._window_start
        if start >= 0 and start + n <= len(self._window):
            return self._window[start : start + n]
        length = min(max(n, READ_AHEAD), self._size - offset)
        try:
            if self._handle is None or self._handle_thread != threading.get_ident():
                self._drop_handle()
                conn = self._store._conn()
                self._handle = conn.blobopen("blobs", "data", self._blob_id, readonly=True)
                self._handle_thread = threading.get_ident()
            self._handle.seek(offset)
            data = self._handle.read(length)
        except sqlite3.Error as exc:
            self._drop_handle()
            raise StoreError(f"cannot read stored blob: {exc}") from exc
        if length > n:
            self._window_start, self._window = offset, data
        return data[:n]

    def _drop_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._handle_thread == threading.get_ident():
            with suppress(sqlite3.Error):
                handle.close()

    def close(self) -> None:
        self._window = b""
        self._drop_handle()

    def __del__(self) -> None:
        self._drop_handle()

    def __enter__(self) -> _BlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _conforms(store: SqliteStore) -> Store:
    """Never called: makes mypy prove that SqliteStore implements the Store protocol."""
    return store
