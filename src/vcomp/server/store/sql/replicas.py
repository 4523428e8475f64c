"""A job's replicas in SQLite: attempts ending, and settling the job by the rules.

Every change to a live job's leases or results ends here: :meth:`Replicas.settle`
reads the job's counters and counted ok results, asks :func:`~vcomp.server.store.rules.settle`
what the job's state is now, and writes that down.
"""

from __future__ import annotations

from dataclasses import dataclass

from vcomp.errors import StoreError
from vcomp.server.store.records import (
    RESULT_OK,
    AttemptRecord,
    AttemptState,
    CandidateResult,
    JobState,
    ResultComparator,
)
from vcomp.server.store.rules import charged_attempts, settle
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Blobs, Connection, Dialect
from vcomp.server.store.sql.queries import ATTEMPT_WITH_JOB, attempt_from_row

# Attempts that drew nothing from the budget (the agents' refusals).
UNCHARGED = "SELECT COUNT(*) FROM attempts WHERE job_id = ? AND state IN ('refused', 'abandoned')"


@dataclass(frozen=True, slots=True)
class LiveAttempt:
    """An attempt and what the rules need to know of its job."""

    record: AttemptRecord
    job_state: JobState
    batch_id: int
    pending: int  # the job's replica slots waiting for a lease


class Replicas:
    """Attempt rows and the job counters that follow them."""

    def __init__(
        self, catalog: Catalog, dialect: Dialect, blobs: Blobs, comparator: ResultComparator
    ) -> None:
        self._catalog = catalog
        self._dialect = dialect
        self._blobs = blobs
        self._comparator = comparator

    @staticmethod
    def find(conn: Connection, job_id: int, attempt: int) -> LiveAttempt | None:
        row = conn.execute(ATTEMPT_WITH_JOB, (job_id, attempt)).fetchone()
        if row is None:
            return None
        return LiveAttempt(attempt_from_row(row), JobState(row[8]), int(row[9]), int(row[10]))

    def get(self, conn: Connection, job_id: int, attempt: int) -> LiveAttempt:
        found = self.find(conn, job_id, attempt)
        if found is None:
            raise StoreError(f"job {job_id} has no attempt {attempt}")
        return found

    def end_attempt(
        self,
        conn: Connection,
        job_id: int,
        attempt: int,
        state: AttemptState,
        when: float,
        reason: str | None,
    ) -> None:
        self._dialect.defer(
            conn,
            "UPDATE attempts SET state = ?, ended_at = ?, reason = ? "
            "WHERE job_id = ? AND attempt = ?",
            (state.value, when, reason, job_id, attempt),
        )

    @staticmethod
    def agent_holds(conn: Connection, job_id: int, agent_id: str) -> bool:
        """Does this agent hold a live lease or a counted ok result for this job?"""
        row = conn.execute(
            "SELECT 1 FROM attempts WHERE job_id = ? AND agent_id = ? "
            "AND state IN ('leased', 'succeeded') LIMIT 1",
            (job_id, agent_id),
        ).fetchone()
        return row is not None

    def fail_attempt(self, conn: Connection, job_id: int, reason: str, now: float) -> JobState:
        """A live job lost one leased replica: note why and let settle requeue or fail."""
        self._dialect.defer(
            conn, "UPDATE jobs SET leased = leased - 1, reason = ? WHERE id = ?", (reason, job_id)
        )
        return self.settle(conn, job_id, now)

    def settle(
        self, conn: Connection, job_id: int, now: float, new_attempt: int | None = None
    ) -> JobState:
        """Bring a live job's state in line with its results, leases and budget."""
        row = conn.execute(
            "SELECT state, batch_id, pending, leased, attempts, reason FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        state = JobState(row[0])
        if state.terminal:
            return state
        uncharged = int(conn.execute(UNCHARGED, (job_id,)).fetchone()[0])
        settlement = settle(
            self._candidates(conn, job_id),
            self._comparator,
            self._catalog.batch(conn, int(row[1])),
            pending=int(row[2]),
            leased=int(row[3]),
            charged=charged_attempts(int(row[4]), uncharged),
            last_failure=row[5],
            new_attempt=new_attempt,
        )
        if settlement.disagreeing_groups is not None:
            self._dialect.defer(
                conn,
                "INSERT INTO disagreements (job_id, attempt, groups, detected_at) "
                "VALUES (?, ?, ?, ?)",
                (job_id, new_attempt, settlement.disagreeing_groups, now),
            )
            self._dialect.defer(
                conn, "UPDATE jobs SET disagreements = disagreements + 1 WHERE id = ?", (job_id,)
            )
        verdict = settlement.verdict
        if verdict.state is JobState.DONE:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = 'done', pending = 0, canonical_attempt = ?, "
                "reason = NULL, finished_at = ? WHERE id = ?",
                (verdict.canonical_attempt, now, job_id),
            )
        elif verdict.state is JobState.FAILED:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = 'failed', pending = 0, reason = ?, finished_at = ? "
                "WHERE id = ?",
                (verdict.reason, now, job_id),
            )
        else:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = ?, pending = ? WHERE id = ?",
                (verdict.state.value, verdict.pending, job_id),
            )
        return verdict.state

    def _candidates(self, conn: Connection, job_id: int) -> list[CandidateResult]:
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
                read=self._blobs.loader(r[4], int(r[2])),
            )
            for r in rows
        ]
