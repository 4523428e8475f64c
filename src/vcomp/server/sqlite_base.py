"""Connection and transaction plumbing shared by every part of :class:`SqliteStore`.

:class:`SqliteBase` owns the per-thread connections, ``_txn`` (``BEGIN IMMEDIATE`` for
writes, ``synchronous`` FULL or NORMAL per transaction), the schema migration and
``close``; :class:`SqliteBlobReader` streams one stored blob. The thread and durability
rules they implement are spelled out in ``store_sqlite``'s module docstring; read them
before changing anything here.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Self

from vcomp.errors import StoreError
from vcomp.server.store import App, Batch, ResultComparator, sha256_equal
from vcomp.server.store_sqlite_schema import MAX_READ_BYTES, MIGRATIONS, READ_AHEAD, SCHEMA_VERSION


class SqliteBase:
    """Connections, transactions and migration; the store's parts build on these.

    See ``store_sqlite``'s module docstring for the thread and durability rules.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        comparator: ResultComparator = sha256_equal,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
    ) -> None:
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise StoreError("the job store needs a file path (WAL does not work in memory)")
        self._comparator = comparator
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # Apps and batches never change once written, so every thread may share these.
        self._apps: dict[int, App] = {}
        self._batches: dict[int, Batch] = {}
        self._migrate()

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed")
            try:
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # only so close() may close it; see thread rules
                )
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.close()
                    raise StoreError(f"{self._path}: cannot use WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_size_limit=67108864")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open job store {self._path}: {exc}") from exc
            self._connections.append(conn)
        self._local.conn = conn
        self._local.durable = True
        return conn

    @contextmanager
    def _txn(self, *, write: bool = False, durable: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            if write and self._local.durable != durable:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._local.durable = durable
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise StoreError(f"job store unavailable: {exc}") from exc
        try:
            yield conn
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"job store error: {exc}") from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(f"job store commit failed: {exc}") from exc

    def _migrate(self) -> None:
        with self._txn(write=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"job store schema v{current} is newer than this vcomp (v{SCHEMA_VERSION})"
                )
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )

    def schema_version(self) -> int:
        with self._txn() as conn:
            return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])

    def journal_mode(self) -> str:
        with self._txn() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                with suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SqliteBlobReader:
    """Range reads of one stored blob, with a read-ahead window.

    The blob handle stays open between reads on the thread that opened it: SQLite
    walks a large blob's overflow-page chain from the start on every open, so
    reopening per window made a streamed transfer quadratic (2.5 ms per 64 KiB
    window at 16 MiB). Holding it keeps a read snapshot open in WAL mode, which
    blocks no writer; :meth:`close` releases it when the transfer ends.
    """

    def __init__(self, store: SqliteBase, blob_id: int | None, size: int, sha256: bytes) -> None:
        self._store = store
        self._blob_id = blob_id
        self._size = size
        self._sha256 = sha256
        self._window_start = 0
        self._window = b""
        self._handle: sqlite3.Blob | None = None
        self._handle_thread = 0

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
        try:
            if self._handle is None or self._handle_thread != threading.get_ident():
                self._drop_handle()
                conn = self._store._conn()
                self._handle = conn.blobopen("blobs", "data", self._blob_id, readonly=True)
                self._handle_thread = threading.get_ident()
            self._handle.seek(offset)
            data = self._handle.read(length)
        except sqlite3.Error as exc:
            self._drop_handle()
            raise StoreError(f"cannot read stored blob: {exc}") from exc
        if length > n:
            self._window_start, self._window = offset, data
        return data[:n]

    def _drop_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and self._handle_thread == threading.get_ident():
            with suppress(sqlite3.Error):
                handle.close()

    def close(self) -> None:
        self._window = b""
        self._drop_handle()

    def __del__(self) -> None:
        self._drop_handle()

    def __enter__(self) -> SqliteBlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
