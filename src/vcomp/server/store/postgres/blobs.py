"""Payload blobs in PostgreSQL: small ones inline in BYTEA, ranged ones in large objects.

Why large objects (and not a chunk table): a staged result upload must be written in
ranges, in place, as SQLite's zeroblob + incremental blob I/O do. ``lo_put(oid, offset,
bytes)`` writes a range without reading or rewriting the rest (PostgreSQL stores a large
object in 2 KiB pages, so a write touches only its pages), ``lo_get(oid, offset, n)``
reads one, and both are plain SQL functions that run inside our transactions, over the
pooled connection, with no client-side large-object API. A chunk table would need its
own chunk arithmetic for unaligned writes and reads. Blobs written whole (job inputs,
inline outputs: most are tiny) stay inline in ``data``, one row and no large-object
metadata. Deleting a blob unlinks its large object in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vcomp.errors import StoreError
from vcomp.server.store.postgres.database import PostgresDatabase
from vcomp.server.store.sql.blobs import BlobStore, WindowedBlobReader
from vcomp.server.store.sql.database import Connection, returning_id

_READ = (
    "SELECT CASE WHEN loid IS NULL THEN substring(data FROM ? FOR ?) "
    "ELSE lo_get(loid, ?, ?) END FROM blobs WHERE id = ?"
)


class PostgresBlobs(BlobStore):
    """Blob rows: insert, reserve and fill in ranges, seal with a SHA-256, delete, read."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @staticmethod
    def reserve(conn: Connection, total: int) -> int:
        """An unsealed blob of ``total`` bytes in a new, empty large object: ranges are
        written into it later; holes read as zeros."""
        cur = conn.execute(
            "INSERT INTO blobs (size, sha256, loid) VALUES (?, NULL, lo_from_bytea(0, ?)) "
            "RETURNING id",
            (total, b""),
        )
        return returning_id(cur)

    @staticmethod
    def write_at(
        conn: Connection, blob_id: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        row = conn.execute(
            "SELECT lo_put(loid, ?, ?) FROM blobs WHERE id = ? AND loid IS NOT NULL",
            (offset, bytes(data), blob_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"blob {blob_id} cannot be written in ranges")

    @contextmanager
    def writer(self, conn: Connection, blob_id: int) -> Iterator[_SequentialWriter]:
        yield _SequentialWriter(self, conn, blob_id)

    @staticmethod
    def delete(conn: Connection, blob_id: int) -> None:
        conn.execute(
            "SELECT lo_unlink(loid) FROM blobs WHERE id = ? AND loid IS NOT NULL", (blob_id,)
        )
        conn.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))

    def reader(self, blob_id: int | None, size: int, sha256: bytes) -> PostgresBlobReader:
        return PostgresBlobReader(self._db, blob_id, size, sha256)


class _SequentialWriter:
    def __init__(self, blobs: PostgresBlobs, conn: Connection, blob_id: int) -> None:
        self._blobs, self._conn, self._blob_id, self._offset = blobs, conn, blob_id, 0

    def write(self, data: bytes, /) -> int:
        self._blobs.write_at(self._conn, self._blob_id, self._offset, data)
        self._offset += len(data)
        return len(data)


class PostgresBlobReader(WindowedBlobReader):
    """Range reads of one stored blob; each window is one short read transaction."""

    def __init__(self, db: PostgresDatabase, blob_id: int | None, size: int, sha256: bytes) -> None:
        super().__init__(blob_id, size, sha256)
        self._db = db

    def _fetch(self, blob_id: int, offset: int, length: int) -> bytes:
        with self._db.transaction() as conn:
            row = conn.execute(_READ, (offset + 1, length, offset, length, blob_id)).fetchone()
        if row is None or row[0] is None:
            raise StoreError(f"stored blob {blob_id} is gone")
        data = bytes(row[0])
        if len(data) < length:  # a staged upload's unwritten tail reads as zeros
            data += bytes(length - len(data))
        return data
