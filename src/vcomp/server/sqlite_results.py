"""Recording results (group commit) and reading them back."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence

from vcomp.errors import StoreError
from vcomp.server.sqlite_base import SqliteBlobReader
from vcomp.server.sqlite_leases import LeasesMixin
from vcomp.server.sqlite_uploads import UploadsMixin
from vcomp.server.store import (
    RESULT_OK,
    AttemptState,
    JobState,
    OutcomeKind,
    RecordOutcome,
    ResultRecord,
    ResultSubmission,
    StoredResult,
)
from vcomp.server.store_sqlite_schema import (
    MAX_TEXT,
    RESULT_SELECT,
    RESULTS_PAGE,
    check_submission,
    result_from_row,
    rowid,
)


class _Rejected(Exception):
    """A submission that is not recorded; side effects so far (discarding) are kept."""

    def __init__(self, detail: str, job_state: JobState | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.job_state = job_state


class ResultsMixin(UploadsMixin, LeasesMixin):
    """``record_results`` and the result queries."""

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

    def open_output(self, job_id: int, attempt: int) -> SqliteBlobReader:
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
        return SqliteBlobReader(self, blob_id, size, bytes(row[2]))

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
