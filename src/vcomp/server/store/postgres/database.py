"""The PostgreSQL connection pool and transaction owner that the shared repositories use.

Sync, in the committer thread, not async
    The :class:`~vcomp.server.store.Store` API is synchronous and shared by both
    backends, the CLI and the tests. The server already runs every write on the
    :class:`~vcomp.server.commit.GroupCommitter` thread and batches results and leases
    into one transaction, so one round trip and one commit serve a whole group; the
    event loop never waits on the database. psycopg releases the GIL while it waits on
    the socket. An async driver would need a second implementation of every repository
    for no fewer round trips.

Connections
    A ``psycopg_pool.ConnectionPool`` (thread-safe): each transaction takes a connection
    and gives it back; a transaction opened inside another on the same thread joins it.
    Opening a store first connects once, so an unreachable database is one clear
    :class:`~vcomp.errors.StoreUnavailable` at start. A connection that breaks (a
    server restart, an admin shutdown, a lost socket) is discarded and the pool's idle
    ones are checked, so the next transaction gets a fresh one; the failed transaction
    raises StoreUnavailable (its commit did not happen or is unknown). Any other
    database error is a :class:`~vcomp.errors.StoreError`. No message ever repeats the
    URL (it may hold a password).

Placeholders
    Shared SQL uses SQLite's ``?`` and ``:name``; :func:`pg_placeholders` rewrites a
    statement to psycopg's ``%s`` / ``%(name)s`` once (cached), and psycopg prepares
    statements it sees repeatedly.

Durability and isolation
    PostgreSQL's default ``synchronous_commit=on``: a commit returns once its WAL is
    flushed, so an acknowledged result is on disk. Writes whose loss is harmless
    (``durable=False``: staged upload chunks, renewals, last-seen times) commit with
    ``synchronous_commit=off``, as SQLite's NORMAL. READ COMMITTED with explicit row
    locks (see :mod:`.dialect`).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from vcomp.errors import StoreError, StoreUnavailable
from vcomp.server.store.postgres.schema import (
    HAS_VERSION_TABLE,
    MIGRATE_LOCK,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from vcomp.server.store.sql import versions
from vcomp.server.store.sql.database import Cursor

# A quoted string or identifier (copied as is), a placeholder, or a literal percent sign.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|::|:([A-Za-z_]\w*)|\?|%")
# SQLSTATE classes and codes that mean the server or the connection went away.
_UNAVAILABLE_CLASSES = ("08", "40", "53", "57P")


@functools.lru_cache(maxsize=512)
def pg_placeholders(sql: str) -> str:
    """``?`` -> ``%s``, ``:name`` -> ``%(name)s``, ``%`` -> ``%%`` (outside quotes)."""

    def swap(match: re.Match[str]) -> str:
        token = match.group(0)
        if match.group(1) is not None:
            return f"%({match.group(1)})s"
        return {"?": "%s", "%": "%%"}.get(token, token)

    return _TOKENS.sub(swap, sql)


class PostgresConnection:
    """One pooled connection inside a transaction, speaking the shared placeholders.

    Deferred writes (:meth:`defer`: statements whose result nobody reads) wait here and
    go out in one pipeline with the next statement or with the COMMIT, so they cost no
    round trip of their own. Statements still run in the order they were issued; an error
    in a deferred write raises from that next :meth:`execute` (or :meth:`commit`).
    """

    __slots__ = ("_deferred", "raw")

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self._deferred: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = None, /) -> Cursor:
        if not self._deferred:
            return self._send(sql, params)
        deferred, self._deferred = self._deferred, []
        with self.raw.pipeline():
            for statement, args in deferred:
                self._send(statement, args)
            cur = self._send(sql, params)
        return cur  # the pipeline's end fetched every result (or raised the first error)

    def defer(self, sql: str, params: Any = None, /) -> None:
        self._deferred.append((sql, params))

    def drop_deferred(self) -> None:
        self._deferred = []

    def commit(self) -> None:
        """Send the deferred writes and COMMIT in one pipeline (one round trip)."""
        if not self._deferred:
            self.raw.commit()
            return
        deferred, self._deferred = self._deferred, []
        with self.raw.pipeline():
            for statement, args in deferred:
                self._send(statement, args)
            self.raw.commit()

    def _send(self, sql: str, params: Any) -> Cursor:
        if params is None:
            return self.raw.execute(sql)
        return self.raw.execute(pg_placeholders(sql), params)


def _reason(exc: BaseException) -> str:
    """The useful end of a libpq message, on one line (it names no password)."""
    text = " ".join(str(exc).split())
    if "failed: " in text:
        text = text.rsplit("failed: ", 1)[1]
    return text[:300] or type(exc).__name__


def is_unavailable(exc: psycopg.Error, conn: psycopg.Connection[Any] | None = None) -> bool:
    if conn is not None and conn.broken:
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith(_UNAVAILABLE_CLASSES)


def _configure(conn: psycopg.Connection[Any]) -> None:
    # Shared SQL writes its joins in a good order; planning the lease pick's six-way
    # join from scratch cost more than running it.
    conn.execute("SET join_collapse_limit = 1")
    conn.commit()


class PostgresDatabase:
    """A connection pool to one PostgreSQL database, transactions, the schema version."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        connect_timeout: float = 10.0,
        wait_timeout: float = 30.0,
    ) -> None:
        self.where = "on PostgreSQL"  # what messages say instead of the URL
        self._wait = wait_timeout
        self._local = threading.local()
        try:
            probe = psycopg.connect(url, connect_timeout=max(1, int(connect_timeout)))
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"job store unavailable: cannot connect to PostgreSQL ({_reason(exc)})"
            ) from None
        with probe:
            self.where = f"{probe.info.dbname!r} on PostgreSQL"
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=wait_timeout,
            name="vcomp-store",
            kwargs={"autocommit": False},
            configure=_configure,
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(
                "job store unavailable: PostgreSQL accepted no pooled connection"
            ) from None

    @contextmanager
    def transaction(
        self, *, write: bool = False, durable: bool = True
    ) -> Iterator[PostgresConnection]:
        """One transaction on a pooled connection; a database error rolls it back and
        becomes StoreUnavailable (connection lost) or StoreError. A transaction opened
        on a thread that is already in one joins it (a comparator reading an output
        written earlier in the same group commit must see it, as on SQLite)."""
        active: PostgresConnection | None = getattr(self._local, "active", None)
        if active is not None:
            yield active
            return
        try:
            conn = self._pool.getconn(timeout=self._wait)
        except PoolTimeout:
            raise StoreUnavailable(
                f"job store unavailable: no PostgreSQL connection within {self._wait:g} s"
            ) from None
        except PoolClosed:
            raise StoreError("the job store is closed") from None
        lost = False
        try:
            try:
                if write and not durable:
                    conn.execute("SET LOCAL synchronous_commit = off")
                self._local.active = active = PostgresConnection(conn)
                try:
                    yield active
                finally:
                    self._local.active = None
                active.commit()
            except psycopg.Error as exc:
                lost = is_unavailable(exc, conn)
                if not conn.broken:
                    with suppress(psycopg.Error):
                        conn.rollback()
                if lost:
                    raise StoreUnavailable(f"job store unavailable: {_reason(exc)}") from None
                raise StoreError(f"job store error: {_reason(exc)}") from exc
            except BaseException:
                if not conn.broken:
                    with suppress(psycopg.Error):
                        conn.rollback()
                raise
        finally:
            if lost and not conn.closed:
                conn.close()  # the pool discards a closed connection
            self._pool.putconn(conn)
            if lost:
                self._pool.check()  # the idle ones died with it: replace them now

    # ------------------------------------------------------------------ schema

    def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema; returns (version before, version now)."""
        return versions.migrate(self, MIGRATIONS, self.where, first=(MIGRATE_LOCK,))

    def check_schema(self) -> None:
        versions.check_schema(self, SCHEMA_VERSION, self.where, has_table=HAS_VERSION_TABLE)

    def schema_version(self) -> int:
        with self.transaction() as conn:
            if conn.execute(HAS_VERSION_TABLE).fetchone() is None:
                return 0
            return versions.read_version(conn)

    def close(self) -> None:
        self._pool.close()
