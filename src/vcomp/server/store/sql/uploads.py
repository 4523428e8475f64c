"""Staged result uploads: large outputs written in ranges into a reserved blob, checked,
then adopted in place when the result is recorded."""

from __future__ import annotations

from collections.abc import Callable

from vcomp.errors import StoreError
from vcomp.server.store.checks import check_size
from vcomp.server.store.records import UploadHandle
from vcomp.server.store.sql.catalog import Catalog
from vcomp.server.store.sql.database import Blobs, Connection, Database, returning_id


class Uploads:
    """Staging blobs for results too large to submit inline."""

    def __init__(
        self,
        db: Database,
        blobs: Blobs,
        catalog: Catalog,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._catalog = catalog
        self._clock = clock

    def attempt_owner(self, job_id: int, attempt: int) -> tuple[str, int] | None:
        """(agent id, output limit) of an attempt, or None if there is no such attempt.

        The server asks before it buffers a byte of an upload it did not hand out itself.
        """
        if not (0 <= job_id < 1 << 63 and 0 <= attempt < 1 << 63):
            return None  # ids off the wire can exceed what SQLite stores
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT a.agent_id, j.batch_id FROM attempts AS a JOIN jobs AS j "
                "ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                return None
            return str(row[0]), self._catalog.batch(conn, int(row[1])).limits.output_bytes

    def begin_result_upload(self, job_id: int, attempt: int, total: int) -> UploadHandle:
        """Reserve a staging blob of ``total`` bytes for a large result."""
        check_size(total, "result upload")
        with self._db.transaction(write=True, durable=False) as conn:
            row = conn.execute(
                "SELECT j.batch_id FROM attempts AS a JOIN jobs AS j ON j.id = a.job_id "
                "WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} has no attempt {attempt}")
            limit = self._catalog.batch(conn, int(row[0])).limits.output_bytes
            if total > limit:
                raise StoreError(f"result of {total} bytes exceeds the job's limit of {limit}")
            blob_id = self._blobs.reserve(conn, total)
            cur = conn.execute(
                "INSERT INTO uploads (job_id, attempt, blob_id, total, high_water, created_at) "
                "VALUES (?, ?, ?, ?, 0, ?) RETURNING id",
                (job_id, attempt, blob_id, total, self._clock()),
            )
            return UploadHandle(returning_id(cur), job_id, attempt, total)

    def write_result_chunk(
        self, handle: UploadHandle, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Write one range of a staged result. Coalescing small chunks is the caller's
        choice: each call is one (unsynced) transaction."""
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > handle.total:
            raise StoreError(
                f"chunk [{offset}, {offset + n}) is outside the {handle.total}-byte upload"
            )
        with self._db.transaction(write=True, durable=False) as conn:
            blob_id, high_water, sealed = self.row(conn, handle)
            if sealed is not None:
                raise StoreError(f"upload {handle.upload_id} is already finished")
            self._blobs.write_at(conn, blob_id, offset, data)
            if offset + n > high_water:
                conn.execute(
                    "UPDATE uploads SET high_water = ? WHERE id = ?", (offset + n, handle.upload_id)
                )

    def finish_upload(self, handle: UploadHandle, output_sha256: bytes) -> None:
        """Check a staged upload is complete and matches ``output_sha256``, then seal it.

        Optional but recommended before ``record_results``: the hashing happens here,
        outside any write transaction, so a 64 MiB result does not stall the group
        commit. A mismatch discards the upload and raises.
        """
        with self._db.transaction() as conn:
            blob_id, high_water, _ = self.row(conn, handle)
        if high_water != handle.total:
            raise StoreError(f"upload incomplete: {high_water} of {handle.total} bytes written")
        digest = self._blobs.sha256(blob_id, handle.total)
        with self._db.transaction(write=True, durable=False) as conn:
            self.row(conn, handle)  # still there?
            if digest != output_sha256:
                self.discard_row(conn, handle.upload_id)
            else:
                self._blobs.seal(conn, blob_id, digest)
        if digest != output_sha256:
            raise StoreError("sha256 mismatch on staged output; upload discarded")

    def discard_upload(self, handle: UploadHandle) -> None:
        with self._db.transaction(write=True, durable=False) as conn:
            self.discard_row(conn, handle.upload_id)

    def discard_stale_uploads(self, before: float) -> int:
        """Drop staged uploads begun before ``before`` (their senders are gone, e.g. after
        a server restart, since handles live only in the server's memory)."""
        with self._db.transaction(write=True, durable=False) as conn:
            ids = [
                int(r[0])
                for r in conn.execute("SELECT id FROM uploads WHERE created_at < ?", (before,))
            ]
            for upload_id in ids:
                self.discard_row(conn, upload_id)
        return len(ids)

    @staticmethod
    def row(conn: Connection, handle: UploadHandle) -> tuple[int, int, bytes | None]:
        """(blob id, bytes written so far, SHA-256 once finish_upload verified it)."""
        row = conn.execute(
            "SELECT u.blob_id, u.high_water, u.job_id, u.attempt, u.total, b.sha256 "
            "FROM uploads AS u JOIN blobs AS b ON b.id = u.blob_id WHERE u.id = ?",
            (handle.upload_id,),
        ).fetchone()
        if row is None or (int(row[2]), int(row[3]), int(row[4])) != (
            handle.job_id,
            handle.attempt,
            handle.total,
        ):
            raise StoreError(f"unknown or finished upload {handle.upload_id}")
        return int(row[0]), int(row[1]), None if row[5] is None else bytes(row[5])

    def discard_row(self, conn: Connection, upload_id: int) -> None:
        row = conn.execute("SELECT blob_id FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            self._blobs.delete(conn, int(row[0]))

    def adopt(self, conn: Connection, upload_id: int, blob_id: int, digest: bytes) -> None:
        """The staging blob becomes the result blob in place: no copy of the payload."""
        self._blobs.seal(conn, blob_id, digest)
        conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
