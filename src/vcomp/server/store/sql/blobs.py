"""What every backend's blob store shares (:class:`BlobStore`: inserting, streaming in,
sealing, hashing and loading a blob) and the bounds and read-ahead window of a range
reader (:class:`WindowedBlobReader`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import BinaryIO, Protocol, Self

from vcomp.errors import StoreError
from vcomp.server.store.checks import COPY_CHUNK, MAX_READ_BYTES
from vcomp.server.store.interface import BlobReader
from vcomp.server.store.sql.database import Connection, returning_id
from vcomp.server.store.sql.queries import READ_AHEAD


class BlobWriter(Protocol):
    def write(self, data: bytes, /) -> object: ...


class WindowedBlobReader:
    """Range reads of one stored blob, at least :data:`READ_AHEAD` bytes at a time (a
    window of CODE chunks per database read). A backend supplies :meth:`_fetch`."""

    def __init__(self, blob_id: int | None, size: int, sha256: bytes) -> None:
        self._blob_id = blob_id
        self._size = size
        self._sha256 = sha256
        self._window_start = 0
        self._window = b""

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> bytes:
        return self._sha256

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset > self._size:
            raise StoreError(f"read [{offset}, +{n}) is outside a {self._size}-byte blob")
        if n > MAX_READ_BYTES:
            raise StoreError(f"read of {n} bytes exceeds the {MAX_READ_BYTES}-byte bound")
        n = min(n, self._size - offset)
        if n == 0 or self._blob_id is None:
            return b""
        start = offset - self._window_start
        if start >= 0 and start + n <= len(self._window):
            return self._window[start : start + n]
        length = min(max(n, READ_AHEAD), self._size - offset)
        data = self._fetch(self._blob_id, offset, length)
        if len(data) < n:
            raise StoreError(f"stored blob is shorter than its {self._size} bytes")
        if length > n:
            self._window_start, self._window = offset, data
        return data[:n]

    def _fetch(self, blob_id: int, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        self._window = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: A new sealed blob (size, sha256, data); returns its id.
INSERT_BLOB = "INSERT INTO blobs (size, sha256, data) VALUES (?, ?, ?) RETURNING id"


class BlobStore:
    """The blob operations whose SQL is the same everywhere, over a backend's
    :meth:`reserve`, :meth:`writer` and :meth:`reader`."""

    def reserve(self, conn: Connection, total: int) -> int:
        raise NotImplementedError

    def writer(self, conn: Connection, blob_id: int) -> AbstractContextManager[BlobWriter]:
        """Sequential writes into a reserved blob, from offset 0."""
        raise NotImplementedError

    def reader(self, blob_id: int | None, size: int, sha256: bytes) -> BlobReader:
        raise NotImplementedError

    @staticmethod
    def insert(conn: Connection, data: bytes, digest: bytes) -> int:
        """A new sealed blob holding ``data`` whose SHA-256 is ``digest``."""
        cur = conn.execute(INSERT_BLOB, (len(data), digest, data))
        return returning_id(cur)

    @staticmethod
    def seal(conn: Connection, blob_id: int, digest: bytes) -> None:
        conn.execute("UPDATE blobs SET sha256 = ? WHERE id = ?", (digest, blob_id))

    def stream_in(self, conn: Connection, stream: BinaryIO, total: int) -> tuple[int, bytes]:
        """A new sealed blob of exactly ``total`` bytes read from ``stream`` in chunks, so
        the payload is never in memory whole; returns (id, SHA-256)."""
        blob_id = self.reserve(conn, total)
        hasher = hashlib.sha256()
        written = 0
        try:
            with self.writer(conn, blob_id) as blob:
                while written < total:
                    chunk = stream.read(min(COPY_CHUNK, total - written))
                    if not chunk:
                        raise StoreError(f"code stream ended after {written} of {total} bytes")
                    blob.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
            if stream.read(1):
                raise StoreError(f"code stream is longer than the {total} bytes declared")
        except OSError as exc:
            raise StoreError(f"cannot read app code: {exc}") from exc
        digest = hasher.digest()
        self.seal(conn, blob_id, digest)
        return blob_id, digest

    def sha256(self, blob_id: int, size: int) -> bytes:
        """Hash a stored blob in chunks, in read transactions of its own."""
        hasher = hashlib.sha256()
        with self.reader(blob_id, size, b"") as reader:
            for offset in range(0, size, COPY_CHUNK):
                hasher.update(reader.read(offset, COPY_CHUNK))
        return hasher.digest()

    def loader(self, blob_id: int | None, size: int) -> Callable[[], bytes]:
        """Reads a whole blob when called (a comparator's ``CandidateResult.read``)."""

        def load() -> bytes:
            if blob_id is None:
                return b""
            with self.reader(blob_id, size, b"") as reader:
                return reader.read(0, size)

        return load
