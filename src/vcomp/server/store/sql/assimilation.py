"""Done jobs waiting for their app's assimilator, and the hook errors jobs keep.

``jobs.assimilate_due`` is set when a job of an app with an assimilator becomes done
(``Replicas.settle``) and cleared once the hook returned, so a server restarted between
the commit and the call still makes it: at least once. A failed call pushes the due
time back and keeps its error in ``jobs.hook_error``, where validators put theirs too.
"""

from __future__ import annotations

from vcomp.server.store.checks import check_finite, check_int
from vcomp.server.store.records import AssimilationDue, HookFailure
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Database

MAX_DUE = 1000  # jobs handed out per call
MAX_HOOK_ERROR = 1000


class Assimilations:
    def __init__(self, db: Database, catalog: Catalog) -> None:
        self._db = db
        self._catalog = catalog

    def due(self, now: float, limit: int) -> list[AssimilationDue]:
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

    def done(self, job_id: int, now: float) -> None:
        """The assimilator returned for this job: never call it again."""
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "UPDATE jobs SET assimilate_due = NULL, assimilated_at = ?, hook_error = NULL "
                "WHERE id = ? AND assimilate_due IS NOT NULL",
                (now, job_id),
            )

    def failed(self, job_id: int, error: str, retry_at: float) -> None:
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
