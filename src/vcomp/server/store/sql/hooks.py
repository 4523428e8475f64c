"""The operator hooks' work in the store: pairs of replicas waiting for their app's
validator, done jobs waiting for its assimilator, and the hook errors jobs keep.

``jobs.validate_due`` is set by ``Replicas.settle`` when a validator app's job has ok
results without a verdict for some pair; :meth:`HookWork.record_verdicts` stores the
validator's answers and settles the job again, in one transaction.

``jobs.assimilate_due`` is set when a job of an app with an assimilator becomes done
(``Replicas.settle``) and cleared once the hook returned, so a server restarted between
the commit and the call still makes it: at least once. A failed call pushes the due
time back and keeps its error in ``jobs.hook_error``, where validators put theirs too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from vcomp.server.store.checks import check_finite, check_int
from vcomp.server.store.records import (
    RESULT_OK,
    AssimilationDue,
    HookFailure,
    JobState,
    PairVerdict,
    ValidationDue,
)
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Connection, Database
from vcomp.server.store.sql.replicas import Replicas

MAX_DUE = 1000  # jobs handed out per call
MAX_HOOK_ERROR = 1000


class HookWork:
    def __init__(self, db: Database, catalog: Catalog, replicas: Replicas) -> None:
        self._db = db
        self._catalog = catalog
        self._replicas = replicas

    # ------------------------------------------------------------------ validators

    def due_validations(self, now: float, limit: int) -> list[ValidationDue]:
        """Jobs with pairs of ok results the validator has not judged, oldest first."""
        check_finite(now, "now")
        check_int(limit, "limit", 1, MAX_DUE)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, batch_id, idx FROM jobs WHERE validate_due IS NOT NULL "
                "AND validate_due <= ? ORDER BY validate_due, id LIMIT ?",
                (now, limit),
            ).fetchall()
            return [
                ValidationDue(
                    job_id=int(r[0]),
                    batch_id=int(r[1]),
                    index=int(r[2]),
                    app=self._catalog.batch(conn, int(r[1])).app,
                    pairs=self._unjudged(conn, int(r[0])),
                )
                for r in rows
            ]

    def _unjudged(self, conn: Connection, job_id: int) -> tuple[tuple[int, int], ...]:
        attempts = [
            int(r[0])
            for r in conn.execute(
                "SELECT attempt FROM results WHERE job_id = ? AND counted = 1 AND status = ? "
                "ORDER BY attempt",
                (job_id, RESULT_OK),
            )
        ]
        judged = self._replicas.verdicts(conn, job_id)
        return tuple(p for p in itertools.combinations(attempts, 2) if p not in judged)

    def record_verdicts(self, job_id: int, verdicts: Sequence[PairVerdict], now: float) -> JobState:
        """Store the validator's answers and settle the job by them (it may wait again:
        a result that came in meanwhile makes a new pair)."""
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            for v in verdicts:
                a, b = sorted((v.attempt_a, v.attempt_b))
                error = None if v.error is None else v.error[:MAX_HOOK_ERROR]
                conn.execute(
                    "INSERT INTO verdicts (job_id, attempt_a, attempt_b, agree, error) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (job_id, a, b, int(v.agree), error),
                )
            conn.execute("UPDATE jobs SET validate_due = NULL WHERE id = ?", (job_id,))
            newest = max((max(v.attempt_a, v.attempt_b) for v in verdicts), default=None)
            return self._replicas.settle(conn, job_id, now, new_attempt=newest)

    # ------------------------------------------------------------------ assimilators

    def due_assimilations(self, now: float, limit: int) -> list[AssimilationDue]:
        """Done jobs whose assimilator is due by ``now``, the longest waiting first."""
        check_finite(now, "now")
        check_int(limit, "limit", 1, MAX_DUE)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT j.id, j.batch_id, j.idx, j.canonical_attempt, j.hook_tries "
                "FROM jobs AS j WHERE j.assimilate_due IS NOT NULL AND j.assimilate_due <= ? "
                "ORDER BY j.assimilate_due, j.id LIMIT ?",
                (now, limit),
            ).fetchall()
            return [
                AssimilationDue(
                    job_id=int(r[0]),
                    batch_id=int(r[1]),
                    index=int(r[2]),
                    canonical_attempt=int(r[3]),
                    app=self._catalog.batch(conn, int(r[1])).app,
                    tries=int(r[4]),
                )
                for r in rows
            ]

    def assimilated(self, job_id: int, now: float) -> None:
        """The assimilator returned for this job: never call it again."""
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "UPDATE jobs SET assimilate_due = NULL, assimilated_at = ?, hook_error = NULL "
                "WHERE id = ? AND assimilate_due IS NOT NULL",
                (now, job_id),
            )

    def assimilation_failed(self, job_id: int, error: str, retry_at: float) -> None:
        """The assimilator raised: keep the error, call it again at ``retry_at``."""
        check_finite(retry_at, "retry_at")
        error = str(error)[:MAX_HOOK_ERROR]  # the hook's own text: may span lines
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "UPDATE jobs SET assimilate_due = ?, hook_error = ?, hook_tries = hook_tries + 1 "
                "WHERE id = ? AND assimilate_due IS NOT NULL",
                (retry_at, error, job_id),
            )

    def failures(self, limit: int) -> list[HookFailure]:
        """Jobs whose hook failed last time (newest jobs first)."""
        check_int(limit, "limit", 1, MAX_DUE)
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, batch_id, idx, hook_error, hook_tries, assimilate_due FROM jobs "
                "WHERE hook_error IS NOT NULL ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            HookFailure(
                job_id=int(r[0]),
                batch_id=int(r[1]),
                index=int(r[2]),
                hook=str(r[3]).split(":", 1)[0],
                error=str(r[3]),
                tries=int(r[4]),
                retry_at=None if r[5] is None else float(r[5]),
            )
            for r in rows
        ]
