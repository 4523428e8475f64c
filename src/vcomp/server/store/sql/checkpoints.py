"""The latest checkpoint a job's running attempt uploaded, kept so a later attempt (on
any agent) resumes from it.

One row per job, replaced in place: only the newest state matters, so the store holds
at most one checkpoint blob per job. A checkpoint is accepted only from the agent that
holds the live lease of that (job, attempt); anything else is refused and keeps nothing.
"""

from __future__ import annotations

import hashlib

from vcomp.errors import StoreError
from vcomp.server.store.checks import check_finite
from vcomp.server.store.interface import BlobReader
from vcomp.server.store.records import StoredCheckpoint
from vcomp.server.store.sql.database import Blobs, Database

#: Default bound on one uploaded checkpoint (the agent's spool bound is the same).
MAX_CHECKPOINT_BYTES = 4 * 1024 * 1024


class Checkpoints:
    def __init__(self, db: Database, blobs: Blobs) -> None:
        self._db = db
        self._blobs = blobs

    def save(
        self,
        job_id: int,
        attempt: int,
        agent_id: str,
        data: bytes,
        now: float,
        *,
        max_bytes: int = MAX_CHECKPOINT_BYTES,
    ) -> None:
        """Keep ``data`` as the job's latest checkpoint; raises StoreError (and keeps
        nothing) unless ``agent_id`` holds the live lease of (job, attempt)."""
        check_finite(now, "now")
        if len(data) > max_bytes:
            raise StoreError(f"checkpoint of {len(data)} bytes exceeds the {max_bytes}-byte bound")
        with self._db.transaction(write=True) as conn:
            held = conn.execute(
                "SELECT 1 FROM attempts WHERE job_id = ? AND attempt = ? AND agent_id = ? "
                "AND state = 'leased'",
                (job_id, attempt, agent_id),
            ).fetchone()
            if held is None:
                raise StoreError(
                    f"agent holds no live lease of job {job_id} attempt {attempt}; "
                    "checkpoint refused"
                )
            old = conn.execute(
                "SELECT blob_id, attempt FROM job_checkpoints WHERE job_id = ?", (job_id,)
            ).fetchone()
            if old is not None and int(old[1]) > attempt:
                raise StoreError(
                    f"job {job_id} keeps attempt {int(old[1])}'s checkpoint, a later attempt "
                    f"than {attempt}; checkpoint refused"
                )
            blob_id = self._blobs.insert(conn, data, hashlib.sha256(data).digest())
            conn.execute(
                "INSERT INTO job_checkpoints (job_id, attempt, blob_id, size, saved_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
                "attempt = excluded.attempt, blob_id = excluded.blob_id, "
                "size = excluded.size, saved_at = excluded.saved_at",
                (job_id, attempt, blob_id, len(data), now),
            )
            if old is not None:
                self._blobs.delete(conn, int(old[0]))

    def latest(self, job_id: int) -> StoredCheckpoint | None:
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT attempt, blob_id, size, saved_at FROM job_checkpoints WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        data = self._blobs.loader(int(row[1]), int(row[2]))()
        return StoredCheckpoint(job_id, int(row[0]), float(row[3]), data)

    def open_latest(self, job_id: int) -> tuple[int, BlobReader] | None:
        """(attempt, range reader) of the job's latest checkpoint, read as it is sent."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT c.attempt, b.id, b.size, b.sha256 FROM job_checkpoints AS c "
                "JOIN blobs AS b ON b.id = c.blob_id WHERE c.job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return int(row[0]), self._blobs.reader(int(row[1]), int(row[2]), bytes(row[3]))

    def drop_finished(self, limit: int) -> int:
        """Forget the checkpoints of up to ``limit`` jobs that are no longer queued or
        leased (no attempt will resume from them); returns how many were dropped."""
        with self._db.transaction(write=True) as conn:
            rows = conn.execute(
                "SELECT c.job_id, c.blob_id FROM job_checkpoints c JOIN jobs j ON j.id = c.job_id "
                "WHERE j.state NOT IN ('queued', 'leased') ORDER BY c.job_id LIMIT ?",
                (limit,),
            ).fetchall()
            for job_id, blob_id in rows:
                conn.execute("DELETE FROM job_checkpoints WHERE job_id = ?", (job_id,))
                self._blobs.delete(conn, int(blob_id))
        return len(rows)
