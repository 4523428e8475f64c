"""Apps, batches, jobs and their input blobs (the write-once half of the SQLite store),
and the status counts over them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import BinaryIO

from vcomp.errors import StoreError
from vcomp.server.store.checks import (
    INT64_MAX,
    MAX_ATTEMPTS,
    MAX_BLOB_BYTES,
    MAX_REPLICAS,
    U64,
    check_int,
    check_name,
    check_positive,
    check_size,
    check_text,
    stream_remaining,
)
from vcomp.server.store.interface import BlobReader, CodeSource
from vcomp.server.store.records import (
    CANCELLED_REASON,
    DEFAULT_DISK_BYTES,
    App,
    AppKind,
    AttemptRecord,
    Batch,
    BatchStatus,
    FailedJob,
    Job,
    JobLimits,
    JobState,
    StoreStatus,
)
from vcomp.server.store.sql.database import Blobs, Connection, Database, Dialect, returning_id
from vcomp.server.store.sql.queries import (
    APP_SELECT,
    ATTEMPT_SELECT,
    JOB_SELECT,
    app_from_row,
    attempt_from_row,
    job_from_row,
)


class Catalog:
    """Apps and batches (cached: they never change once written), jobs, inputs."""

    def __init__(
        self, db: Database, dialect: Dialect, blobs: Blobs, clock: Callable[[], float]
    ) -> None:
        self._db = db
        self._dialect = dialect
        self._blobs = blobs
        self._clock = clock
        # Apps and batches never change once written, so every thread may share these.
        self._apps: dict[int, App] = {}
        self._batches: dict[int, Batch] = {}

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
        name = check_name(name, "app name")
        for hook, what in ((validator, "validator"), (assimilator, "assimilator")):
            if hook is not None:
                check_text(hook, what)
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
            with self._db.transaction(write=True) as conn:
                blob_id, digest = self._blobs.stream_in(conn, stream, total)
                version = int(
                    conn.execute(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM apps WHERE name = ?", (name,)
                    ).fetchone()[0]
                )
                created = self._clock()
                cur = conn.execute(
                    "INSERT INTO apps (name, version, kind, blob_id, created_at, validator, "
                    "assimilator) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (name, version, app_kind.value, blob_id, created, validator, assimilator),
                )
                app_id = returning_id(cur)
        return App(app_id, name, version, app_kind, total, digest, created, validator, assimilator)

    def retire_app(self, name: str, version: int) -> App:
        """No new batch may use this version; batches made with it run on."""
        with self._db.transaction(write=True) as conn:
            cur = conn.execute(
                "UPDATE apps SET retired_at = COALESCE(retired_at, ?) "
                "WHERE name = ? AND version = ?",
                (self._clock(), name, version),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown app {name!r} v{version}")
        return self.get_app(name, version)

    def get_app(self, name: str, version: int | None = None) -> App:
        with self._db.transaction() as conn:
            if version is None:
                row = conn.execute(
                    APP_SELECT + " WHERE a.name = ? AND a.retired_at IS NULL "
                    "ORDER BY a.version DESC LIMIT 1",
                    (name,),
                ).fetchone()
                if (
                    row is None
                    and conn.execute("SELECT 1 FROM apps WHERE name = ?", (name,)).fetchone()
                ):
                    raise StoreError(f"every version of app {name!r} is retired")
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
        with self._db.transaction() as conn:
            return self.app(conn, app_id)

    def app(self, conn: Connection, app_id: int) -> App:
        app = self._apps.get(app_id)
        if app is None:
            row = conn.execute(APP_SELECT + " WHERE a.id = ?", (app_id,)).fetchone()
            if row is None:
                raise StoreError(f"unknown app id {app_id}")
            app = self._apps[app_id] = app_from_row(row)
        return app

    def list_apps(self) -> list[App]:
        with self._db.transaction() as conn:
            rows = conn.execute(APP_SELECT + " ORDER BY a.name, a.version").fetchall()
        return [app_from_row(row) for row in rows]

    def open_code(self, app_id: int) -> BlobReader:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT b.id, b.size, b.sha256 FROM apps AS a JOIN blobs AS b ON b.id = a.blob_id "
                "WHERE a.id = ?",
                (app_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown app id {app_id}")
        return self._blobs.reader(int(row[0]), int(row[1]), bytes(row[2]))

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
        disk_bytes: int = DEFAULT_DISK_BYTES,
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
        check_int(disk_bytes, "disk_bytes", 1, INT64_MAX)
        if deadline is not None:
            check_positive(deadline, "deadline")
        app = self.get_app(app_name, app_version)
        if app.retired_at is not None:
            raise StoreError(f"app {app.name!r} v{app.version} is retired; submit another version")
        with self._db.transaction(write=True) as conn:
            cur = conn.execute(
                "INSERT INTO batches (app_id, created_at, n_jobs, replicas, quorum, max_attempts, "
                "cpu_seconds, memory_bytes, wall_seconds, output_bytes, disk_bytes, deadline) "
                "VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                    disk_bytes,
                    deadline,
                ),
            )
            batch_id = returning_id(cur)
            count = 0
            for index, data in enumerate(inputs):
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise StoreError(f"input {index} is {type(data).__name__}, not bytes")
                data = bytes(data)
                check_size(len(data), f"input {index}")
                blob_id = self._blobs.insert(conn, data, hashlib.sha256(data).digest())
                conn.execute(
                    "INSERT INTO jobs (batch_id, idx, input_blob, state, pending, leased, "
                    "attempts) VALUES (?, ?, ?, 'queued', ?, 0, 0)",
                    (batch_id, index, blob_id, replicas),
                )
                count += 1
            if count == 0:
                raise StoreError("a batch needs at least one input")
            conn.execute("UPDATE batches SET n_jobs = ? WHERE id = ?", (count, batch_id))
        # Fresh statistics, so the lease pick walks the queue in id order and stops at
        # the first fit rather than sorting every queued job (PostgreSQL's planner
        # took thousands of new jobs for one).
        with self._db.transaction(write=True, durable=False) as conn:
            for statement in self._dialect.after_bulk_insert:
                conn.execute(statement)
        return batch_id

    def get_batch(self, batch_id: int) -> Batch:
        with self._db.transaction() as conn:
            return self.batch(conn, batch_id)

    def batch(self, conn: Connection, batch_id: int) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            row = conn.execute(
                "SELECT id, app_id, created_at, n_jobs, replicas, quorum, max_attempts, "
                "cpu_seconds, memory_bytes, wall_seconds, output_bytes, deadline, disk_bytes "
                "FROM batches WHERE id = ?",
                (batch_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown batch {batch_id}")
            batch = Batch(
                batch_id=int(row[0]),
                app=self.app(conn, int(row[1])),
                created_at=float(row[2]),
                n_jobs=int(row[3]),
                replicas=int(row[4]),
                quorum=int(row[5]),
                max_attempts=int(row[6]),
                limits=JobLimits(
                    float(row[7]), int(row[8]), float(row[9]), int(row[10]), int(row[12])
                ),
                deadline=None if row[11] is None else float(row[11]),
            )
            if batch.n_jobs > 0:  # not mid-creation: safe to cache
                self._batches[batch_id] = batch
        return batch

    def newest_batch_id(self) -> int:
        with self._db.transaction() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM batches").fetchone()[0])

    def list_batches(self) -> list[Batch]:
        with self._db.transaction() as conn:
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM batches ORDER BY id")]
            return [self.batch(conn, batch_id) for batch_id in ids]

    def get_job(self, job_id: int) -> Job:
        with self._db.transaction() as conn:
            row = conn.execute(
                JOB_SELECT + " WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown job {job_id}")
        return job_from_row(row)

    def failed_jobs(self, batch_id: int, limit: int) -> list[Job]:
        """The batch's failed jobs, the most recent first (their reason says why)."""
        check_int(limit, "limit", 1, 10_000)
        with self._db.transaction() as conn:
            rows = conn.execute(
                JOB_SELECT + " WHERE j.batch_id = ? AND j.state = 'failed' "
                "ORDER BY j.finished_at DESC, j.idx DESC LIMIT ?",
                (batch_id, limit),
            ).fetchall()
        return [job_from_row(row) for row in rows]

    def get_job_by_index(self, batch_id: int, index: int) -> Job:
        with self._db.transaction() as conn:
            row = conn.execute(
                JOB_SELECT + " WHERE j.batch_id = ? AND j.idx = ?",
                (batch_id, index),
            ).fetchone()
        if row is None:
            raise StoreError(f"batch {batch_id} has no job {index}")
        return job_from_row(row)

    def list_attempts(self, job_id: int) -> list[AttemptRecord]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                ATTEMPT_SELECT + " WHERE job_id = ? ORDER BY attempt",
                (job_id,),
            ).fetchall()
        return [attempt_from_row(r) for r in rows]

    def open_input(self, job_id: int) -> BlobReader:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT b.id, b.size, b.sha256 FROM jobs AS j JOIN blobs AS b "
                "ON b.id = j.input_blob WHERE j.id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"unknown job {job_id}")
        return self._blobs.reader(int(row[0]), int(row[1]), bytes(row[2]))

    def read_input_chunk(self, job_id: int, offset: int, n: int) -> bytes:
        with self.open_input(job_id) as reader:
            return reader.read(offset, n)

    # ------------------------------------------------------------------ status

    def status(self) -> StoreStatus:
        with self._db.transaction() as conn:
            agents = int(conn.execute("SELECT COUNT(*) FROM agents").fetchone()[0])
            jobs = dict.fromkeys(JobState, 0)
            for state, count in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                jobs[JobState(state)] = int(count)
            ids = [int(r[0]) for r in conn.execute("SELECT id FROM batches ORDER BY id")]
            batches = tuple(self._batch_status(conn, batch_id) for batch_id in ids)
        return StoreStatus(agents, jobs, batches)

    def recent_failures(self, limit: int) -> list[FailedJob]:
        if not 0 < limit <= 1000:
            raise StoreError(f"recent_failures: limit must be 1..1000, got {limit}")
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT batch_id, idx, id, reason, finished_at FROM jobs WHERE state = 'failed' "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            FailedJob(int(b), int(i), int(j), str(r or ""), None if f is None else float(f))
            for b, i, j, r, f in rows
        ]

    def queued_by_app(self) -> dict[str, int]:
        # One pass over the partial index of queued jobs: cheap enough for every scrape.
        # Live apps start at 0 so a metric's series reads 0 when the app runs dry.
        with self._db.transaction() as conn:
            live = conn.execute("SELECT DISTINCT name FROM apps WHERE retired_at IS NULL")
            queued = {str(name): 0 for (name,) in live.fetchall()}
            rows = conn.execute(
                "SELECT a.name, COUNT(*) FROM jobs AS j JOIN batches AS b ON b.id = j.batch_id "
                "JOIN apps AS a ON a.id = b.app_id WHERE j.state = 'queued' GROUP BY a.name"
            ).fetchall()
        queued.update((str(name), int(count)) for name, count in rows)
        return queued

    def batch_status(self, batch_id: int) -> BatchStatus:
        with self._db.transaction() as conn:
            return self._batch_status(conn, batch_id)

    def _batch_status(self, conn: Connection, batch_id: int) -> BatchStatus:
        batch = self.batch(conn, batch_id)
        counts = dict.fromkeys(JobState, 0)
        disagreements = 0
        for state, count, disagree in conn.execute(
            "SELECT state, COUNT(*), SUM(disagreements) FROM jobs WHERE batch_id = ? "
            "GROUP BY state",
            (batch_id,),
        ):
            counts[JobState(state)] = int(count)
            disagreements += int(disagree or 0)
        cancelled = int(
            conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE batch_id = ? AND state = 'failed' AND reason = ?",
                (batch_id, CANCELLED_REASON),
            ).fetchone()[0]
        )
        row = conn.execute("SELECT cancelled_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
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
            failed=counts[JobState.FAILED] - cancelled,
            disagreements=disagreements,
            cancelled=cancelled,
            cancelled_at=None if row is None or row[0] is None else float(row[0]),
        )
