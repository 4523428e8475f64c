"""Staged result uploads: large outputs written in ranges into a reserved blob, checked,
then adopted in place by ``record_results``."""

from __future__ import annotations

import hashlib
import sqlite3

from vcomp.errors import StoreError
from vcomp.server.sqlite_apps import AppsMixin
from vcomp.server.sqlite_base import SqliteBlobReader
from vcomp.server.store import UploadHandle
from vcomp.server.store_sqlite_schema import COPY_CHUNK, check_size, rowid


class UploadsMixin(AppsMixin):
    """Staging blobs for results too large to submit inline."""

    def attempt_owner(self, job_id: int, attempt: int) -> tuple[str, int] | None:
        """(agent id, output limit) of an attempt, or None if there is no such attempt.

        The server asks before it buffers a byte of an upload it did not hand out itself.
        """
        if not (0 <= job_id < 1 << 63 and 0 <= attempt < 1 << 63):
            return None  # ids off the wire can exceed what SQLite stores
        with self._txn() as conn:
            row = conn.execute(
                "SELECT a.agent_id, j.batch_id FROM attempts AS a JOIN jobs AS j "
                "ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                return None
            return str(row[0]), self._batch(conn, int(row[1])).limits.output_bytes

    def begin_result_upload(self, job_id: int, attempt: int, total: int) -> UploadHandle:
        """Reserve a staging blob of ``total`` bytes for a large result."""
        check_size(total, "result upload")
        with self._txn(write=True, durable=False) as conn:
            row = conn.execute(
                "SELECT j.batch_id FROM attempts AS a JOIN jobs AS j ON j.id = a.job_id "
                "WHERE a.job_id = ? AND a.attempt = ?",
                (job_id, attempt),
            ).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} has no attempt {attempt}")
            limit = self._batch(conn, int(row[0])).limits.output_bytes
            if total > limit:
                raise StoreError(f"result of {total} bytes exceeds the job's limit of {limit}")
            blob = conn.execute(
                "INSERT INTO blobs (size, sha256, data) VALUES (?, NULL, zeroblob(?))",
                (total, total),
            )
            cur = conn.execute(
                "INSERT INTO uploads (job_id, attempt, blob_id, total, high_water, created_at) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                (job_id, attempt, rowid(blob), total, self._clock()),
            )
            return UploadHandle(rowid(cur), job_id, attempt, total)

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
        with self._txn(write=True, durable=False) as conn:
            blob_id, high_water, sealed = self._upload_row(conn, handle)
            if sealed is not None:
                raise StoreError(f"upload {handle.upload_id} is already finished")
            with conn.blobopen("blobs", "data", blob_id) as blob:
                blob.seek(offset)
                blob.write(data)
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
        with self._txn() as conn:
            blob_id, high_water, _ = self._upload_row(conn, handle)
        if high_water != handle.total:
            raise StoreError(f"upload incomplete: {high_water} of {handle.total} bytes written")
        digest = self._hash_blob(blob_id, handle.total)
        with self._txn(write=True, durable=False) as conn:
            self._upload_row(conn, handle)  # still there?
            if digest != output_sha256:
                self._discard_upload(conn, handle.upload_id)
            else:
                conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))
        if digest != output_sha256:
            raise StoreError("sha256 mismatch on staged output; upload discarded")

    def _hash_blob(self, blob_id: int, size: int) -> bytes:
        hasher = hashlib.sha256()
        with SqliteBlobReader(self, blob_id, size, b"") as reader:
            for offset in range(0, size, COPY_CHUNK):
                hasher.update(reader.read(offset, COPY_CHUNK))
        return hasher.digest()

    def discard_upload(self, handle: UploadHandle) -> None:
        with self._txn(write=True, durable=False) as conn:
            self._discard_upload(conn, handle.upload_id)

    def discard_stale_uploads(self, before: float) -> int:
        """Drop staged uploads begun before ``before`` (their senders are gone, e.g. after
        a server restart, since handles live only in the server's memory)."""
        with self._txn(write=True, durable=False) as conn:
            ids = [
                int(r[0])
                for r in conn.execute("SELECT id FROM uploads WHERE created_at < ?", (before,))
            ]
            for upload_id in ids:
                self._discard_upload(conn, upload_id)
        return len(ids)

    @staticmethod
    def _upload_row(
        conn: sqlite3.Connection, handle: UploadHandle
    ) -> tuple[int, int, bytes | None]:
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

    @staticmethod
    def _discard_upload(conn: sqlite3.Connection, upload_id: int) -> None:
        row = conn.execute("SELECT blob_id FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
            conn.execute("DELETE FROM blobs WHERE id = ?", (row[0],))
