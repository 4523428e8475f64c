"""A job's replicas in SQLite: attempts ending, and settling the job by the rules.

Every change to a live job's leases or results ends here: :meth:`Replicas.settle`
reads the job's counters and counted ok results, asks :func:`~vcomp.server.store.rules.settle`
what the job's state is now, and writes that down.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vcomp.errors import HookError, StoreError
from vcomp.server.store.records import (
    RESULT_OK,
    AttemptRecord,
    AttemptState,
    CandidateResult,
    JobState,
    PairVerdict,
    ResultComparator,
)
from vcomp.server.store.rules import SlotChange, charged_attempts, settle
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Blobs, Connection, Dialect
from vcomp.server.store.sql.queries import (
    ATTEMPT_WITH_JOB,
    ATTEMPTS_WITH_JOB_AND_RESULT,
    attempt_from_row,
)

# What settle reads, in one statement: the job's counters, its attempts that drew nothing
# from the budget (the agents' refusals), and its counted ok results (a row each, or one
# row of NULLs when there are none).
SETTLE_READ = (
    "SELECT j.state, j.batch_id, j.pending, j.leased, j.attempts, j.reason, "
    "(SELECT COUNT(*) FROM attempts AS a WHERE a.job_id = j.id "
    "AND a.state IN ('refused', 'abandoned')), "
    "r.attempt, r.agent_id, r.output_size, r.output_sha256, r.output_blob "
    "FROM jobs AS j LEFT JOIN results AS r "
    "ON r.job_id = j.id AND r.counted = 1 AND r.status = ? "
    "WHERE j.id = ? ORDER BY r.attempt"
)


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
        self._with_results = ATTEMPTS_WITH_JOB_AND_RESULT.format(
            job_in_jobs=dialect.in_list.format(column="a.job_id", name="jobs")
        )
        self._blobs = blobs
        self._comparator = comparator

    @staticmethod
    def find(conn: Connection, job_id: int, attempt: int) -> LiveAttempt | None:
        row = conn.execute(ATTEMPT_WITH_JOB, (job_id, attempt)).fetchone()
        if row is None:
            return None
        return LiveAttempt(attempt_from_row(row), JobState(row[8]), int(row[9]), int(row[10]))

    def find_with_results(
        self, conn: Connection, job_ids: Sequence[int]
    ) -> dict[tuple[int, int], tuple[LiveAttempt, bytes | None]]:
        """Every attempt of these jobs (as :meth:`find`), by (job, attempt), with the
        digest of its recorded result if it has one: one statement for a result group."""
        if not job_ids:
            return {}
        args = {"jobs": self._dialect.id_list(sorted(set(job_ids)))}
        found: dict[tuple[int, int], tuple[LiveAttempt, bytes | None]] = {}
        for row in conn.execute(self._with_results, args).fetchall():
            live = LiveAttempt(attempt_from_row(row), JobState(row[8]), int(row[9]), int(row[10]))
            digest = None if row[11] is None else bytes(row[11])
            found[live.record.job_id, live.record.attempt] = live, digest
        return found

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

    def fail_job(self, conn: Connection, job_id: int, reason: str, now: float) -> JobState:
        """A live job fails now (its failure repeats): one leased replica ends with it;
        others still out come back as evidence."""
        self._dialect.defer(
            conn,
            "UPDATE jobs SET state = 'failed', pending = 0, leased = leased - 1, reason = ?, "
            "finished_at = ? WHERE id = ?",
            (reason, now, job_id),
        )
        return JobState.FAILED

    def settle(
        self,
        conn: Connection,
        job_id: int,
        now: float,
        new_attempt: int | None = None,
        *,
        slot: SlotChange = SlotChange.NONE,
    ) -> JobState:
        """Bring a live job's state in line with its results, leases and budget.

        ``slot`` (FREE_LEASED or FILL_PENDING) is a replica slot the caller's change
        fills: its counter is lowered by one in the same write as the settlement."""
        rows = conn.execute(SETTLE_READ, (RESULT_OK, job_id)).fetchall()
        row = rows[0]
        state = JobState(row[0])
        pending = int(row[2]) - (slot is SlotChange.FILL_PENDING)
        leased = int(row[3]) - (slot is SlotChange.FREE_LEASED)
        if state.terminal:
            if slot is not SlotChange.NONE:
                self._dialect.defer(
                    conn,
                    "UPDATE jobs SET pending = ?, leased = ? WHERE id = ?",
                    (pending, leased, job_id),
                )
            return state
        uncharged = int(row[6])
        batch = self._catalog.batch(conn, int(row[1]))
        candidates = self._candidates(job_id, [r[7:] for r in rows if r[7] is not None])
        comparator = self._comparator
        if batch.app.validator is not None and batch.quorum > 1:
            validated = self._validated(conn, job_id, candidates)
            if validated is None:  # judged once the validator answered
                waiting = JobState.QUEUED if pending > 0 else JobState.LEASED
                self._dialect.defer(
                    conn,
                    "UPDATE jobs SET state = ?, pending = ?, leased = ?, validate_due = ? "
                    "WHERE id = ?",
                    (waiting.value, pending, leased, now, job_id),
                )
                return waiting
            comparator = validated
        settlement = settle(
            candidates,
            comparator,
            batch,
            pending=pending,
            leased=leased,
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
        if settlement.hook_error is not None:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET hook_error = ?, hook_tries = hook_tries + 1 WHERE id = ?",
                (settlement.hook_error, job_id),
            )
        verdict = settlement.verdict
        if verdict.state is JobState.DONE:
            # An app with an assimilator: the job is due for it from now on.
            due = now if batch.app.assimilator is not None else None
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = 'done', pending = 0, leased = ?, canonical_attempt = ?, "
                "reason = NULL, finished_at = ?, assimilate_due = ? WHERE id = ?",
                (leased, verdict.canonical_attempt, now, due, job_id),
            )
        elif verdict.state is JobState.FAILED:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = 'failed', pending = 0, leased = ?, reason = ?, "
                "finished_at = ? WHERE id = ?",
                (leased, verdict.reason, now, job_id),
            )
        else:
            self._dialect.defer(
                conn,
                "UPDATE jobs SET state = ?, pending = ?, leased = ? WHERE id = ?",
                (verdict.state.value, verdict.pending, leased, job_id),
            )
        return verdict.state

    @staticmethod
    def verdicts(conn: Connection, job_id: int) -> dict[tuple[int, int], PairVerdict]:
        rows = conn.execute(
            "SELECT attempt_a, attempt_b, agree, error FROM verdicts WHERE job_id = ?", (job_id,)
        ).fetchall()
        return {
            (int(r[0]), int(r[1])): PairVerdict(int(r[0]), int(r[1]), bool(r[2]), r[3])
            for r in rows
        }

    def _validated(
        self, conn: Connection, job_id: int, candidates: list[CandidateResult]
    ) -> ResultComparator | None:
        """The comparator of a validator app: its recorded verdicts. None while a pair of
        ok results has none yet (the validator runs off the writer thread, see
        vcomp.server.hooks, and the job is settled again when it answered)."""
        verdicts = self.verdicts(conn, job_id)
        pairs = {(a.attempt, b.attempt) for a, b in itertools.combinations(candidates, 2)}
        if not pairs <= verdicts.keys():
            return None

        def recorded(a: CandidateResult, b: CandidateResult) -> bool:
            found = verdicts[min(a.attempt, b.attempt), max(a.attempt, b.attempt)]
            if found.error is not None:
                raise HookError(found.error)
            return found.agree

        return recorded

    def _candidates(self, job_id: int, rows: list[Any]) -> list[CandidateResult]:
        """Counted ok results (attempt, agent, size, digest, blob) as the rules see them."""
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
