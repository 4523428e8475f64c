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

import hashlib
from typing import BinaryIO

from vcomp.errors import StoreError
from vcomp.server.store.checks import COPY_CHUNK
from vcomp.server.store.postgres.database import PostgresDatabase
from vcomp.server.store.sql.blobs import BlobHashing, WindowedBlobReader
from vcomp.server.store.sql.database import Connection, returning_id

_READ = (
    "SELECT CASE WHEN loid IS NULL THEN substring(data FROM ? FOR ?) "
    "ELSE lo_get(loid, ?, ?) END FROM blobs WHERE id = ?"
)


class PostgresBlobs(BlobHashing):
    """Blob rows: insert, reserve and fill in ranges, seal with a SHA-256, delete, read."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @staticmethod
    def insert(conn: Connection, data: bytes, digest: bytes) -> int:
        cur = conn.execute(
            "INSERT INTO blobs (size, sha256, data) VALUES (?, ?, ?) RETURNING id",
            (len(data), digest, data),
        )
        return returning_id(cur)

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

    def stream_in(self, conn: Connection, stream: BinaryIO, total: int) -> tuple[int, bytes]:
        """A new sealed blob of exactly ``total`` bytes read from ``stream`` in chunks, so
        the payload is never in memory whole; returns (id, SHA-256)."""
        blob_id = self.reserve(conn, total)
        hasher = hashlib.sha256()
        written = 0
        try:
            while written < total:
                chunk = stream.read(min(COPY_CHUNK, total - written))
                if not chunk:
                    raise StoreError(f"code stream ended after {written} of {total} bytes")
                self.write_at(conn, blob_id, written, chunk)
                hasher.update(chunk)
                written += len(chunk)
            if stream.read(1):
                raise StoreError(f"code stream is longer than the {total} bytes declared")
        except OSError as exc:
            raise StoreError(f"cannot read app code: {exc}") from exc
        digest = hasher.digest()
        self.seal(conn, blob_id, digest)
        return blob_id, digest

    @staticmethod
    def seal(conn: Connection, blob_id: int, digest: bytes) -> None:
        conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))

    @staticmethod
    def delete(conn: Connection, blob_id: int) -> None:
        conn.execute(
            "SELECT lo_unlink(loid) FROM blobs WHERE id = ? AND loid IS NOT NULL", (blob_id,)
        )
        conn.execute("DELETE FROM blobs WHERE id = ?", (blob_id,))

    def reader(self, blob_id: int | None, size: int, sha256: bytes) -> PostgresBlobReader:
        return PostgresBlobReader(self._db, blob_id, size, sha256)


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
