"""Leasing jobs to agents: picking, renewing, releasing, refusing, expiring.

Which job fits an agent is the dialect's lease pick (the distinct-host and fit rules as
SQL, :func:`~.queries.lease_pick`; on PostgreSQL it skips rows other servers hold
locked, so two servers never wait on or double-lease one job); every other decision is
a call into :mod:`vcomp.server.store.rules`. Each path that reads a job's state and then
writes it locks the job row first (:meth:`~.database.Dialect.lock_jobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vcomp.server.store.checks import INT64_MAX, check_finite, check_positive, check_text
from vcomp.server.store.records import (
    AttemptState,
    ExpiredLease,
    JobState,
    Lease,
    LeaseRequest,
)
from vcomp.server.store.rules import (
    CHARGED_STATES,
    job_state_after_lease,
    refusal_window_start,
    refusals_exhausted,
    refused_attempt_state,
    renewed_deadline,
)
from vcomp.server.store.sql.agents import Agents
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Connection, Database, Dialect
from vcomp.server.store.sql.queries import PICK_WINDOW, REFUSALS_SINCE
from vcomp.server.store.sql.replicas import Replicas

_CHARGED_STATES = [state.value for state in CHARGED_STATES]

# Leases past their deadline; the job rows are locked before the attempts are re-read.
_EXPIRED_JOBS = "SELECT DISTINCT job_id FROM attempts WHERE state = 'leased' AND deadline <= ?"
_EXPIRED_ATTEMPTS = (
    "SELECT a.job_id, a.attempt, a.agent_id, j.state FROM attempts AS a "
    "JOIN jobs AS j ON j.id = a.job_id "
    "WHERE a.state = 'leased' AND a.deadline <= ? AND a.job_id = ? ORDER BY a.attempt"
)

# Leases issued by a server not heard from since a time (or never registered).
ORPHAN_REASON = "its server stopped"
_ORPHANED_JOBS = (
    "SELECT DISTINCT job_id FROM attempts WHERE state = 'leased' AND server_id IS NOT NULL "
    "AND server_id NOT IN (SELECT id FROM servers WHERE last_seen >= ?)"
)
_ORPHANED_ATTEMPTS = (
    "SELECT a.job_id, a.attempt, a.agent_id, j.state FROM attempts AS a "
    "JOIN jobs AS j ON j.id = a.job_id WHERE a.state = 'leased' AND a.server_id IS NOT NULL "
    "AND a.server_id NOT IN (SELECT id FROM servers WHERE last_seen >= ?) "
    "AND a.job_id = ? ORDER BY a.attempt"
)

# Live jobs of batches whose deadline passed: they fail (locked first, like the above).
_OVERDUE_JOBS = (
    "SELECT j.id FROM jobs AS j JOIN batches AS b ON b.id = j.batch_id "
    "WHERE j.state IN ('queued', 'leased') AND b.deadline IS NOT NULL AND b.deadline <= ?"
)
_FAIL_OVERDUE = (
    "UPDATE jobs SET state = 'failed', pending = 0, reason = 'batch deadline passed', "
    "finished_at = ? WHERE id = ? AND state IN ('queued', 'leased')"
)


def _pick_args(request: LeaseRequest, agent_id: str, dialect: Dialect) -> dict[str, object]:
    cap = request.capacity
    return {
        "now": request.now,
        "agent": agent_id,
        "memory_bytes": min(cap.memory_bytes, INT64_MAX),
        "cpu_seconds": cap.cpu_seconds,
        "wall_seconds": cap.wall_seconds,
        "output_bytes": cap.output_bytes,
        "disk_bytes": min(cap.disk_bytes, INT64_MAX),
        "job_bytes": cap.job_bytes,
        "kinds": dialect.text_list(list(cap.kinds)),
        "charged_states": dialect.text_list(_CHARGED_STATES),
    }


class Leases:
    """The lease half of the store; results are in :mod:`.results`."""

    def __init__(
        self,
        db: Database,
        dialect: Dialect,
        catalog: Catalog,
        agents: Agents,
        replicas: Replicas,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._dialect = dialect
        self._catalog = catalog
        self._agents = agents
        self._replicas = replicas
        self._clock = clock

    def lease_many(self, requests: Sequence[LeaseRequest]) -> list[Lease | None]:
        """Serve several lease requests in one transaction (one fsync)."""
        for request in requests:
            check_finite(request.now, "now")
            check_positive(request.lease_seconds, "lease_seconds")
        if not requests:
            return []
        with self._db.transaction(write=True) as conn:
            return [self._lease_one(conn, request) for request in requests]

    def _lease_one(self, conn: Connection, request: LeaseRequest) -> Lease | None:
        agent_id = self._agents.known(conn, request.agent_id)
        if request.refusal_cap is not None and refusals_exhausted(
            self._refusals(conn, agent_id, request.now), request.refusal_cap
        ):
            return None
        row = self._pick(conn, _pick_args(request, agent_id, self._dialect))
        if row is None:
            return None
        job_id, batch_id, index, pending = int(row[0]), int(row[1]), int(row[2]), int(row[3])
        attempt = int(row[4]) + 1
        deadline = float(request.now + request.lease_seconds)
        self._dialect.defer(
            conn,
            "UPDATE jobs SET pending = pending - 1, leased = leased + 1, attempts = ?, state = ? "
            "WHERE id = ?",
            (attempt, job_state_after_lease(pending).value, job_id),
        )
        self._dialect.defer(
            conn,
            "INSERT INTO attempts (job_id, attempt, agent_id, state, leased_at, deadline, "
            "server_id) VALUES (?, ?, ?, 'leased', ?, ?, ?)",
            (job_id, attempt, agent_id, request.now, deadline, request.server_id),
        )
        batch = self._catalog.batch(conn, batch_id)
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

    def _pick(self, conn: Connection, args: dict[str, object]) -> Any:
        """The first fitting queued job. Where the dialect asks for it, one window of
        the queue at a time, each window four times the last, so a pick that finds
        nothing costs a few queries over the whole queue, not one per window."""
        args["after"] = 0
        if not self._dialect.pick_in_windows:
            return conn.execute(self._dialect.lease_pick(None), args).fetchone()
        size = PICK_WINDOW
        while True:
            row = conn.execute(self._dialect.lease_pick(size), args).fetchone()
            if row is not None:
                return row
            last, count = conn.execute(self._dialect.lease_window_end(size), args).fetchone()
            if count < size:
                return None  # that window was the rest of the queue
            args["after"], size = int(last), size * 4

    def renew(
        self, job_id: int, attempt: int, now: float, lease_seconds: float, transfer_seconds: float
    ) -> float | None:
        check_finite(now, "now")
        check_positive(lease_seconds, "lease_seconds")
        check_positive(transfer_seconds, "transfer_seconds")
        with self._db.transaction(write=True, durable=False) as conn:
            self._dialect.lock_jobs(conn, [job_id])
            live = self._replicas.get(conn, job_id, attempt)
            deadline = renewed_deadline(
                live.record,
                live.job_state,
                now=now,
                lease_seconds=lease_seconds,
                wall_seconds=self._catalog.batch(conn, live.batch_id).limits.wall_seconds,
                transfer_seconds=transfer_seconds,
            )
            if deadline is not None:
                conn.execute(
                    "UPDATE attempts SET deadline = ? WHERE job_id = ? AND attempt = ?",
                    (deadline, job_id, attempt),
                )
            return deadline

    def release(self, job_id: int, attempt: int, reason: str, now: float | None) -> bool:
        reason = check_text(reason, "reason")
        when = self._clock() if now is None else now
        with self._db.transaction(write=True) as conn:
            self._dialect.lock_jobs(conn, [job_id])
            live = self._replicas.get(conn, job_id, attempt)
            if live.record.state is not AttemptState.LEASED:
                return False
            self._replicas.end_attempt(conn, job_id, attempt, AttemptState.RELEASED, when, reason)
            if not live.job_state.terminal:
                self._replicas.fail_attempt(conn, job_id, f"released: {reason}", when)
            return True

    def refuse(
        self, job_id: int, attempt: int, agent_id: str, reason: str, now: float, offer_again: bool
    ) -> int | None:
        reason = check_text(reason, "reason")
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            agent_id = self._agents.known(conn, agent_id)
            self._dialect.lock_jobs(conn, [job_id])
            live = self._replicas.get(conn, job_id, attempt)
            if live.record.state is not AttemptState.LEASED or live.record.agent_id != agent_id:
                return None
            state = refused_attempt_state(offer_again)
            self._replicas.end_attempt(conn, job_id, attempt, state, now, reason)
            if not live.job_state.terminal:
                self._replicas.fail_attempt(conn, job_id, f"{state.value}: {reason}", now)
            return self._refusals(conn, agent_id, now)

    @staticmethod
    def _refusals(conn: Connection, agent_id: str, now: float) -> int:
        since = refusal_window_start(now)
        return int(conn.execute(REFUSALS_SINCE, (agent_id, since)).fetchone()[0])

    def expire(self, now: float) -> list[ExpiredLease]:
        """End every lease past its deadline. Jobs another transaction holds locked are
        skipped (on PostgreSQL two servers expiring at once take disjoint jobs; the next
        pass takes the rest), and each attempt is re-read after its job is locked, so
        an attempt ends once however many servers expire."""
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            expired = self._end_leases(
                conn,
                (_EXPIRED_JOBS, _EXPIRED_ATTEMPTS),
                (now,),
                AttemptState.EXPIRED,
                "lease expired",
                now,
            )
            overdue = [int(r[0]) for r in conn.execute(_OVERDUE_JOBS, (now,)).fetchall()]
            for job_id in self._dialect.lock_jobs(conn, overdue, skip_locked=True):
                conn.execute(_FAIL_OVERDUE, (now, job_id))
        return expired

    def release_orphans(self, now: float, silent_since: float) -> list[ExpiredLease]:
        """Release the leases of servers not heard from since ``silent_since``: their
        START may never have reached the agent, which then cannot hand the job back."""
        check_finite(now, "now")
        check_finite(silent_since, "silent_since")
        with self._db.transaction(write=True) as conn:
            return self._end_leases(
                conn,
                (_ORPHANED_JOBS, _ORPHANED_ATTEMPTS),
                (silent_since,),
                AttemptState.RELEASED,
                ORPHAN_REASON,
                now,
            )

    def _end_leases(
        self,
        conn: Connection,
        queries: tuple[str, str],
        params: tuple[object, ...],
        state: AttemptState,
        reason: str,
        now: float,
    ) -> list[ExpiredLease]:
        jobs_sql, attempts_sql = queries
        ended: list[ExpiredLease] = []
        candidates = [int(r[0]) for r in conn.execute(jobs_sql, params).fetchall()]
        for job_id in self._dialect.lock_jobs(conn, candidates, skip_locked=True):
            for _, attempt, agent_id, job_state_text in conn.execute(
                attempts_sql, (*params, job_id)
            ).fetchall():
                self._replicas.end_attempt(conn, job_id, attempt, state, now, reason)
                job_state = JobState(job_state_text)
                if not job_state.terminal:
                    job_state = self._replicas.fail_attempt(conn, job_id, reason, now)
                ended.append(ExpiredLease(job_id, int(attempt), str(agent_id), job_state))
        return ended
