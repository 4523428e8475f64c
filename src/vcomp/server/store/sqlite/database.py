"""The SQLite connection and transaction owner that every repository of the store shares.

Thread rules
    A :class:`SqliteDatabase` may be shared by threads: each thread transparently gets
    its own connection (thread-local), and no connection is ever used by two threads.
    Write transactions start with ``BEGIN IMMEDIATE`` so writers queue on SQLite's lock
    (with a busy timeout) instead of failing when a read transaction tries to upgrade.
    A lock still held by someone else after the busy timeout, or a disk I/O error, is
    :class:`~vcomp.errors.StoreUnavailable` (the server rides it out); other errors are
    :class:`~vcomp.errors.StoreError`.
    WAL lets readers (e.g. the event loop streaming CODE chunks) run while one writer
    (the :class:`~vcomp.server.commit.GroupCommitter` thread) commits. ``close()``
    closes every idle connection at once; one that another thread is using (inside
    :meth:`SqliteDatabase.using`) is closed by that thread when it is done, because
    closing an SQLite connection under a running statement crashes the process.

Durability
    In WAL mode ``synchronous=NORMAL`` appends a commit to the WAL without fsync and
    syncs only at checkpoints. That survives a crash of this process (the bytes are in
    the OS page cache) but a power cut or kernel crash may drop the latest commits. An
    acknowledged result lets the agent delete its spooled copy, so a dropped commit
    would be a lost result: results, leases and everything the CLI writes commit with
    ``synchronous=FULL`` (``durable=True``), which fsyncs the WAL at every commit. Group
    commit (commit.py) shares that fsync among many results. Writes whose loss is
    harmless (staged upload chunks, lease renewals, last-seen times, TPM clock
    snapshots, taking reset requests) use NORMAL; the next FULL commit syncs the WAL
    file and with it everything written before, since the WAL is one append-only file.

Schema
    The ``schema_version`` table says which of :data:`~.schema.MIGRATIONS` have run
    (:mod:`vcomp.server.store.sql.versions`, shared with PostgreSQL).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from vcomp.errors import StoreError, StoreUnavailable
from vcomp.server.store.sql import versions
from vcomp.server.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION

HAS_VERSION_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"

# Primary result codes that mean "the store cannot be used now", not "this operation is
# wrong": another process holds the lock past the busy timeout, or the disk failed.
_UNAVAILABLE_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR})


def store_error(what: str, exc: sqlite3.Error) -> StoreError:
    """``exc`` as vcomp's error: StoreUnavailable for a lock held too long or an I/O
    error (the server keeps its sessions and retries), else StoreError."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _UNAVAILABLE_CODES:
        return StoreUnavailable(f"job store unavailable: {exc}")
    return StoreError(f"{what}: {exc}")


class SqliteDatabase:
    """Per-thread connections to one SQLite file, transactions, and the schema version."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise StoreError("the job store needs a file path (WAL does not work in memory)")
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._busy: dict[sqlite3.Connection, int] = {}  # statements running, per connection
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed")
            try:
                conn = sqlite3.connect(
                    self.path,
                    timeout=self._busy_timeout,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # only so close() may close it; see thread rules
                )
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    conn.close()
                    raise StoreError(f"{self.path}: cannot use WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA journal_size_limit=67108864")
            except sqlite3.Error as exc:
                raise store_error(f"cannot open job store {self.path}", exc) from exc
            self._connections.append(conn)
        self._local.conn = conn
        self._local.durable = True
        return conn

    @contextmanager
    def transaction(
        self, *, write: bool = False, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection; any sqlite3 error becomes a
        StoreError and rolls it back."""
        conn = self.connection()
        with self.using(conn):
            yield from self._transaction(conn, write=write, durable=durable)

    def _transaction(
        self, conn: sqlite3.Connection, *, write: bool, durable: bool
    ) -> Iterator[sqlite3.Connection]:
        try:
            if write and self._local.durable != durable:
                conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._local.durable = durable
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise store_error("job store unavailable", exc) from exc
        try:
            yield conn
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise store_error("job store error", exc) from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise store_error("job store commit failed", exc) from exc

    # ------------------------------------------------------------------ schema

    def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema; returns (version before, version now)."""
        return versions.migrate(self, MIGRATIONS, self.path)

    def check_schema(self) -> None:
        """Refuse a store whose schema is not this vcomp's version."""
        versions.check_schema(self, SCHEMA_VERSION, self.path, has_table=HAS_VERSION_TABLE)

    def schema_version(self) -> int:
        with self.transaction() as conn:
            return versions.read_version(conn)

    def journal_mode(self) -> str:
        with self.transaction() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    @contextmanager
    def using(self, conn: sqlite3.Connection) -> Iterator[None]:
        """Mark ``conn`` as running statements, so :meth:`close` leaves it to this thread."""
        self._take(conn)
        try:
            yield
        finally:
            with self._lock:
                left = self._busy.pop(conn) - 1
                if left:
                    self._busy[conn] = left
                elif self._closed:
                    with suppress(sqlite3.Error):
                        conn.close()

    def _take(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed")
            self._busy[conn] = self._busy.get(conn, 0) + 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                if conn not in self._busy:
                    with suppress(sqlite3.Error):
                        conn.close()
            self._connections.clear()
        self._local = threading.local()
