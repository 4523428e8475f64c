"""Recording results (group commit) and reading them back.

Which outcome a result gets and what it changes are :mod:`~vcomp.server.store.rules`
decisions (``classify_result``, ``result_effect``); this module reads the rows those
rules need and writes what they decide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

from vcomp.errors import StoreError, StoreUnavailable
from vcomp.server.store.checks import MAX_TEXT, check_submission
from vcomp.server.store.interface import BlobReader
from vcomp.server.store.records import (
    RESULT_OK,
    JobState,
    OutcomeKind,
    RecordOutcome,
    ResultRecord,
    ResultSubmission,
    StoredResult,
)
from vcomp.server.store.rules import (
    DEFAULT_SAME_FAILURES,
    SlotChange,
    checked_status,
    classify_result,
    failure_reason,
    repeated_failure,
    result_effect,
)
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Blobs, Connection, Database, Dialect
from vcomp.server.store.sql.queries import RESULT_SELECT, RESULTS_PAGE, result_from_row
from vcomp.server.store.sql.replicas import LiveAttempt, Replicas
from vcomp.server.store.sql.uploads import Uploads

_INSERT_RESULT = (
    "INSERT INTO results (job_id, attempt, agent_id, status, error, output_size, "
    "output_sha256, cpu_ms, wall_ms, received_at, counted, output_blob) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
# The output's blob (as blobs.INSERT_BLOB) and the result in one statement, where the
# dialect has writes in WITH.
_INSERT_RESULT_WITH_BLOB = (
    "WITH new_blob AS (INSERT INTO blobs (size, sha256, data) VALUES (?, ?, ?) RETURNING id) "
    "INSERT INTO results (job_id, attempt, agent_id, status, error, output_size, "
    "output_sha256, cpu_ms, wall_ms, received_at, counted, output_blob) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, new_blob.id FROM new_blob ON CONFLICT DO NOTHING"
)


class _AlreadyRecorded(Exception):
    """Another transaction recorded this (job, attempt) first: undo ours, report duplicate."""


class _Rejected(Exception):
    """A submission that is not recorded; side effects so far (discarding) are kept."""

    def __init__(self, detail: str, job_state: JobState | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.job_state = job_state


def _storable(sub: ResultSubmission) -> bool:
    # ids off the wire may not fit a BIGINT; such a submission is rejected later anyway
    return 0 <= sub.job_id < 1 << 63


class _GroupReads:
    """The attempts a result group names, read in one statement before any is recorded.
    A job's first result in a pass uses them; a later one reads its job again (the first
    may have changed it)."""

    def __init__(self, replicas: Replicas, conn: Connection, job_ids: list[int]) -> None:
        self._replicas = replicas
        self._read = replicas.find_with_results(conn, job_ids)
        self._touched: set[int] = set()

    def new_pass(self) -> None:
        """The group was undone: what was read before it holds again."""
        self._touched.clear()

    def find(
        self, conn: Connection, sub: ResultSubmission
    ) -> tuple[LiveAttempt, bytes | None] | None:
        if not _storable(sub):
            return None
        key = sub.job_id, sub.attempt
        if sub.job_id in self._touched:
            return self._replicas.find_with_results(conn, [sub.job_id]).get(key)
        self._touched.add(sub.job_id)
        return self._read.get(key)


class Results:
    """``record_results`` and the result queries."""

    def __init__(
        self,
        db: Database,
        dialect: Dialect,
        blobs: Blobs,
        catalog: Catalog,
        replicas: Replicas,
        uploads: Uploads,
        clock: Callable[[], float],
        same_failures: int = DEFAULT_SAME_FAILURES,
    ) -> None:
        self._db = db
        self._same_failures = same_failures
        self._dialect = dialect
        self._blobs = blobs
        self._catalog = catalog
        self._replicas = replicas
        self._uploads = uploads
        self._clock = clock

    def record(self, results: Sequence[ResultSubmission]) -> list[RecordOutcome]:
        """Record many results in ONE durable transaction (group commit).

        Per-result problems never abort the others: they come back as REJECTED outcomes.
        The jobs are locked first, all in one statement in id order (see the locking
        rule in :mod:`.database`). The group first runs under one savepoint; only if a
        statement fails (a constraint, a lost race) is it undone and run again with a
        savepoint per result, so the usual group pays two savepoint round trips, not
        two per result.
        """
        if not results:
            return []
        with self._db.transaction(write=True) as conn:
            self._dialect.defer(conn, "SAVEPOINT record_group", ())
            job_ids = [sub.job_id for sub in results if _storable(sub)]
            self._dialect.lock_jobs(conn, job_ids)
            reads = _GroupReads(self._replicas, conn, job_ids)
            undo_group: tuple[type[Exception], ...] = (_AlreadyRecorded, *self._row_errors())
            try:
                outcomes = [self._record_rejecting(conn, sub, reads) for sub in results]
                conn.execute("RELEASE record_group")  # and the last deferred writes
                return outcomes
            except StoreUnavailable:
                raise  # the database is gone: the whole group fails, nothing to undo
            except undo_group:
                self._dialect.rollback_to(conn, "record_group")
            reads.new_pass()
            return [self._record_isolated(conn, sub, reads) for sub in results]

    def _row_errors(self) -> tuple[type[Exception], ...]:
        return (StoreError, *self._dialect.statement_errors)

    def _record_rejecting(
        self, conn: Connection, sub: ResultSubmission, reads: _GroupReads
    ) -> RecordOutcome:
        try:
            return self._record_one(conn, sub, reads)
        except _Rejected as rejected:  # keep its cleanup (discarded upload)
            return RecordOutcome(
                sub.job_id, sub.attempt, OutcomeKind.REJECTED, rejected.job_state, rejected.detail
            )

    def _record_isolated(
        self, conn: Connection, sub: ResultSubmission, reads: _GroupReads
    ) -> RecordOutcome:
        """One result under its own savepoint: a failed statement undoes only this one."""
        conn.execute("SAVEPOINT record_one")
        try:
            outcome = self._record_rejecting(conn, sub, reads)
            conn.execute("RELEASE record_one")  # sends its deferred writes: errors land here
            return outcome
        except _AlreadyRecorded:
            self._dialect.rollback_to(conn, "record_one")
            outcome = RecordOutcome(
                sub.job_id,
                sub.attempt,
                OutcomeKind.DUPLICATE,
                self._replicas.get(conn, sub.job_id, sub.attempt).job_state,
                "already recorded",
            )
        except StoreUnavailable:
            raise
        except self._row_errors() as exc:
            self._dialect.rollback_to(conn, "record_one")
            outcome = RecordOutcome(sub.job_id, sub.attempt, OutcomeKind.REJECTED, None, str(exc))
        conn.execute("RELEASE record_one")
        return outcome

    def _record_one(
        self, conn: Connection, sub: ResultSubmission, reads: _GroupReads
    ) -> RecordOutcome:
        check_submission(sub)
        upload_id = None if sub.upload is None else sub.upload.upload_id
        found = reads.find(conn, sub)
        if found is None:
            self._discard_if(conn, upload_id)
            raise _Rejected(f"job {sub.job_id} has no attempt {sub.attempt}", None)
        live, previous = found
        job_state = live.job_state
        if live.record.agent_id != sub.agent_id:
            self._discard_if(conn, upload_id)
            raise _Rejected(f"attempt {sub.attempt} was leased to another agent", job_state)
        if previous is not None:
            self._discard_if(conn, upload_id)
            same = sub.output_sha256 is None or previous == sub.output_sha256
            detail = "already recorded" if same else "already recorded (first result kept)"
            return RecordOutcome(sub.job_id, sub.attempt, OutcomeKind.DUPLICATE, job_state, detail)

        limit = self._catalog.batch(conn, live.batch_id).limits.output_bytes
        blob, size, digest = self._take_output(conn, sub, job_state, limit)
        status, error = checked_status(sub.status, sub.error, size, limit)
        error = error.replace("\x00", "\ufffd")  # PostgreSQL text holds no NUL
        ok = status == RESULT_OK
        kind = classify_result(
            job_state,
            live.record.state,
            ok=ok,
            pending=live.pending,
            agent_holds=lambda: self._replicas.agent_holds(conn, sub.job_id, sub.agent_id),
        )
        effect = result_effect(kind, live.record.state, ok=ok)
        received = sub.received_at or self._clock()
        values = (
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
            int(effect.counted),
        )
        if isinstance(blob, bytes) and self._dialect.writes_in_with:
            cur = conn.execute(_INSERT_RESULT_WITH_BLOB, (len(blob), digest, blob, *values))
        else:
            if isinstance(blob, bytes):
                blob = self._blobs.insert(conn, blob, digest)
            cur = conn.execute(_INSERT_RESULT, (*values, blob))
        if cur.rowcount == 0:
            raise _AlreadyRecorded
        failure = failure_reason(status, error, MAX_TEXT)
        if effect.ends_attempt is not None:
            self._replicas.end_attempt(
                conn, sub.job_id, sub.attempt, effect.ends_attempt, received, failure
            )
        if effect.slots is SlotChange.FAIL_LEASED:
            final = repeated_failure(
                failure or status,
                self._same_failures_before(conn, sub, status, error),
                self._same_failures,
            )
            if final is not None:
                job_state = self._replicas.fail_job(conn, sub.job_id, final, received)
            else:
                job_state = self._replicas.fail_attempt(
                    conn, sub.job_id, failure or status, received
                )
        elif effect.slots is not SlotChange.NONE:
            job_state = self._replicas.settle(
                conn, sub.job_id, received, new_attempt=sub.attempt, slot=effect.slots
            )
        detail = "" if effect.counted else f"job is {job_state.value}; kept as evidence"
        return RecordOutcome(sub.job_id, sub.attempt, kind, job_state, detail)

    def _same_failures_before(
        self, conn: Connection, sub: ResultSubmission, status: str, error: str
    ) -> int:
        """Other agents whose counted results of this job failed with this status and
        error (one agent alone, repeating itself, must not fail a job: see
        ``agent_attempt_cap``)."""
        if self._same_failures < 2:
            return 0
        row = conn.execute(
            "SELECT COUNT(DISTINCT agent_id) FROM results WHERE job_id = ? AND agent_id <> ? "
            "AND counted = 1 AND status = ? AND error = ?",
            (sub.job_id, sub.agent_id, status, error),
        ).fetchone()
        return int(row[0])

    def _take_output(
        self, conn: Connection, sub: ResultSubmission, job_state: JobState, limit: int
    ) -> tuple[int | bytes | None, int, bytes]:
        """The output's blob (an adopted staged upload's id, or inline bytes to store with
        the result, or None: nothing kept), its size and its SHA-256."""
        if sub.upload is None:
            return self._take_inline(conn, sub, job_state, limit)
        handle = sub.upload
        try:
            blob_id, high_water, sealed = self._uploads.row(conn, handle)
        except StoreError as exc:
            raise _Rejected(str(exc), job_state) from None
        if (handle.job_id, handle.attempt) != (sub.job_id, sub.attempt):
            raise _Rejected("upload belongs to another attempt", job_state)
        if sub.output_size is not None and sub.output_size != handle.total:
            self._uploads.discard_row(conn, handle.upload_id)
            raise _Rejected(
                f"size mismatch: declared {sub.output_size}, staged {handle.total}", job_state
            )
        if high_water != handle.total:
            self._uploads.discard_row(conn, handle.upload_id)
            raise _Rejected(
                f"upload incomplete: {high_water} of {handle.total} bytes written", job_state
            )
        # Hash now unless finish_upload already did (outside the write transaction).
        digest = sealed if sealed is not None else self._blobs.sha256(blob_id, handle.total)
        if digest != sub.output_sha256:
            self._uploads.discard_row(conn, handle.upload_id)
            raise _Rejected("sha256 mismatch on staged output", job_state)
        self._uploads.adopt(conn, handle.upload_id, blob_id, digest)
        return blob_id, handle.total, digest

    def _take_inline(
        self, conn: Connection, sub: ResultSubmission, job_state: JobState, limit: int
    ) -> tuple[bytes | None, int, bytes]:
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
        return data, len(data), digest

    def _discard_if(self, conn: Connection, upload_id: int | None) -> None:
        if upload_id is not None:
            self._uploads.discard_row(conn, upload_id)

    def exists(self, job_id: int, attempt: int) -> bool:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT 1 FROM results WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
        return row is not None

    def list(self, job_id: int) -> list[StoredResult]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                RESULT_SELECT + " WHERE job_id = ? ORDER BY attempt", (job_id,)
            ).fetchall()
        return [result_from_row(r) for r in rows]

    def open_output(self, job_id: int, attempt: int) -> BlobReader:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT output_blob, output_size, output_sha256 FROM results "
                "WHERE job_id = ? AND attempt = ?",
                (job_id, attempt),
            ).fetchone()
        if row is None:
            raise StoreError(f"no result for job {job_id} attempt {attempt}")
        blob_id = None if row[0] is None else int(row[0])
        size = 0 if blob_id is None else int(row[1])
        return self._blobs.reader(blob_id, size, bytes(row[2]))

    def iterate(self, batch_id: int) -> Iterator[ResultRecord]:
        """Yield every job of a batch in index order, with its canonical result.

        Reads a page at a time in short transactions, so no snapshot stays open while
        the caller writes files.
        """
        self._catalog.get_batch(batch_id)
        last = -1
        while True:
            with self._db.transaction() as conn:
                rows = conn.execute(
                    "SELECT j.id, j.idx, bl.sha256, j.state, j.reason, j.canonical_attempt "
                    "FROM jobs AS j JOIN blobs AS bl ON bl.id = j.input_blob "
                    "WHERE j.batch_id = ? AND j.idx > ? ORDER BY j.idx LIMIT ?",
                    (batch_id, last, RESULTS_PAGE),
                ).fetchall()
                page = [self._record(conn, *row) for row in rows]
            if not page:
                return
            yield from page
            last = page[-1].index

    @staticmethod
    def _record(
        conn: Connection,
        job_id: int,
        index: int,
        input_sha: bytes,
        state: str,
        reason: str | None,
        canonical: int | None,
    ) -> ResultRecord:
        if canonical is not None:
            result_row = conn.execute(
                RESULT_SELECT + " WHERE job_id = ? AND attempt = ?", (job_id, canonical)
            ).fetchone()
        else:
            result_row = conn.execute(
                RESULT_SELECT + " WHERE job_id = ? AND counted = 1 ORDER BY attempt DESC LIMIT 1",
                (job_id,),
            ).fetchone()
        return ResultRecord(
            job_id=int(job_id),
            index=int(index),
            input_sha256=bytes(input_sha),
            state=JobState(state),
            reason=None if reason is None else str(reason),
            result=None if result_row is None else result_from_row(result_row),
        )
