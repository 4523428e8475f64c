"""What an operator does to a whole batch: cancel it, or resubmit its failed jobs.

Cancelling fails every unfinished job with reason ``cancelled`` in one transaction: a
terminal job is never leased again, and a result that still arrives for it is kept as
evidence only (``rules.classify_result``), never counted. Retrying does not touch the
failed jobs' attempt accounting; it submits their inputs again as a new batch of the
same app version and limits, so every attempt keeps its history.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import IO

from vcomp.errors import StoreError
from vcomp.server.store.records import CANCELLED_REASON
from vcomp.server.store.sql.database import Database

READ_CHUNK = 1 << 20


class BatchControl:
    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def cancel(self, batch_id: int) -> int:
        """Fail every queued or leased job of the batch; how many were cancelled."""
        now = self._clock()
        with self._db.transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                raise StoreError(f"unknown batch {batch_id}")
            conn.execute(
                "UPDATE batches SET cancelled_at = ? WHERE id = ? AND cancelled_at IS NULL",
                (now, batch_id),
            )
            cur = conn.execute(
                "UPDATE jobs SET state = 'failed', pending = 0, reason = ?, finished_at = ? "
                "WHERE batch_id = ? AND state IN ('queued', 'leased')",
                (CANCELLED_REASON, now, batch_id),
            )
            return int(cur.rowcount)

    def failed_jobs(self, batch_id: int) -> list[tuple[int, int]]:
        """(index, job id) of the batch's failed jobs that were not cancelled, by index."""
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM batches WHERE id = ?", (batch_id,)).fetchone() is None:
                raise StoreError(f"unknown batch {batch_id}")
            rows = conn.execute(
                "SELECT idx, id FROM jobs WHERE batch_id = ? AND state = 'failed' "
                "AND (reason IS NULL OR reason <> ?) ORDER BY idx",
                (batch_id, CANCELLED_REASON),
            ).fetchall()
        return [(int(r[0]), int(r[1])) for r in rows]


class SpooledInputs:
    """Jobs' inputs copied to a temporary file before a new batch is created from them:
    creating it then reads no blob while it writes, one input in memory at a time."""

    def __init__(
        self,
        job_ids: list[int],
        read_chunk: Callable[[int, int, int], bytes],
        size_of: Callable[[int], int],
    ) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="vcomp-retry-")  # noqa: SIM115
        self._sizes: list[int] = []
        try:
            for job_id in job_ids:
                size = size_of(job_id)
                for offset in range(0, size, READ_CHUNK):
                    self._file.write(read_chunk(job_id, offset, min(READ_CHUNK, size - offset)))
                self._sizes.append(size)
        except BaseException:
            self._file.close()
            raise

    def inputs(self) -> Iterator[bytes]:
        self._file.seek(0)
        for size in self._sizes:
            yield self._file.read(size)

    def close(self) -> None:
        self._file.close()
