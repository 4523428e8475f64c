"""Leasing jobs to agents, renewing, releasing and expiring leases, and settling a job's
state from its replicas' results."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence

from vcomp.errors import StoreError
from vcomp.server.sqlite_agents import AgentsMixin
from vcomp.server.sqlite_base import SqliteBlobReader
from vcomp.server.store import (
    DEFAULT_TRANSFER_SECONDS,
    REFUSAL_WINDOW,
    RESULT_OK,
    AttemptState,
    CandidateResult,
    ExpiredLease,
    JobState,
    Lease,
    LeaseRequest,
    group_results,
    is_disagreement,
    judge,
)
from vcomp.server.store_sqlite_schema import (
    CHARGED_ATTEMPTS,
    LEASE_PICK,
    REFUSALS_SINCE,
    SQLITE_INT_MAX,
    check_finite,
    check_positive,
    check_text,
)


def _pick_args(request: LeaseRequest, agent_id: str) -> dict[str, object]:
    cap = request.capacity
    return {
        "now": request.now,
        "agent": agent_id,
        "memory_bytes": min(cap.memory_bytes, SQLITE_INT_MAX),
        "cpu_seconds": cap.cpu_seconds,
        "wall_seconds": cap.wall_seconds,
        "output_bytes": cap.output_bytes,
        "disk_bytes": min(cap.disk_bytes, SQLITE_INT_MAX),
        "job_bytes": cap.job_bytes,
        "kinds": json.dumps(list(cap.kinds)),
    }


class LeasesMixin(AgentsMixin):
    """Leases and the replication verdict (``_settle``) that every lease or result change runs."""

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
        cap = request.refusal_cap
        if cap is not None and self._refusals(conn, agent_id, request.now) >= cap:
            return None
        row = conn.execute(LEASE_PICK, _pick_args(request, agent_id)).fetchone()
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
        self,
        job_id: int,
        attempt: int,
        now: float,
        lease_seconds: float,
        *,
        transfer_seconds: float = DEFAULT_TRANSFER_SECONDS,
    ) -> float | None:
        """Extend a live lease; ``None`` if the attempt is no longer the live lease.

        Never past the hard deadline, ``leased_at + lease_seconds + wall_seconds +
        transfer_seconds``: a holder that keeps renewing but never finishes loses the
        job then, and expire_leases reissues it.
        """
        check_finite(now, "now")
        check_positive(lease_seconds, "lease_seconds")
        check_positive(transfer_seconds, "transfer_seconds")
        with self._txn(write=True, durable=False) as conn:
            row = conn.execute(
                "SELECT a.state, j.state, a.leased_at, b.wall_seconds FROM attempts AS a "
                "JOIN jobs AS j ON j.id = a.job_id JOIN batches AS b ON b.id = j.batch_id "
                "WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} has no attempt {attempt}")
            if AttemptState(row[0]) is not AttemptState.LEASED or JobState(row[1]).terminal:
                return None
            hard = float(row[2]) + lease_seconds + float(row[3]) + transfer_seconds
            deadline = min(now + lease_seconds, hard)
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
        """``agent_id`` refuses its live lease: requeue the job without charging it.

        With ``offer_again`` false the job is never leased to this agent again.
        Returns the agent's refusals in the last :data:`REFUSAL_WINDOW` seconds, this
        one included, or None if the attempt is not this agent's live lease.
        """
        reason = check_text(reason, "reason")
        check_finite(now, "now")
        with self._txn(write=True) as conn:
            agent_id = self._known_agent(conn, agent_id)
            attempt_state, job_state, holder = self._attempt_row(conn, job_id, attempt)
            if attempt_state is not AttemptState.LEASED or holder != agent_id:
                return None
            state = AttemptState.ABANDONED if offer_again else AttemptState.REFUSED
            self._end_attempt(conn, job_id, attempt, state, now, reason)
            if not job_state.terminal:
                self._fail_attempt(conn, job_id, f"{state.value}: {reason}", now)
            return self._refusals(conn, agent_id, now)

    @staticmethod
    def _refusals(conn: sqlite3.Connection, agent_id: str, now: float) -> int:
        return int(conn.execute(REFUSALS_SINCE, (agent_id, now - REFUSAL_WINDOW)).fetchone()[0])

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
            attempts=int(conn.execute(CHARGED_ATTEMPTS, (job_id,)).fetchone()[0]),
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
            with SqliteBlobReader(self, blob_id, size, b"") as reader:
                return reader.read(0, size)

        return load
