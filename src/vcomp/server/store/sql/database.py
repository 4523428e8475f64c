"""What the shared SQL repositories need of a backend: a :class:`Database`, a
:class:`Dialect` and a :class:`Blobs`.

Shared SQL is written once with ``?`` and ``:name`` placeholders (SQLite's native
styles; the PostgreSQL connection translates them). It avoids ``::`` casts and ``%``
outside placeholders. What differs between backends (the lease pick, row locks, blob
storage, the schema DDL) is the dialect's and the blob store's.

Locking rule (a no-op on SQLite, where ``BEGIN IMMEDIATE`` serialises writers)
    Every write path that reads a job's state and then writes it first locks that job's
    row with :meth:`Dialect.lock_jobs`. Several jobs are locked in one statement in
    job-id order, so two servers' group commits never deadlock.

Round trips (each statement on PostgreSQL is one, ~75 µs here)
    A write whose result nobody reads goes through :meth:`Dialect.defer`: PostgreSQL
    sends it in one pipeline with the next statement or the COMMIT. Reads that need no
    decision in between are one statement (joins, scalar subqueries), and a result group
    runs under one savepoint (see :mod:`.results`). ``bench/profile_store.py`` counts
    the statements of a lease and a record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol

from vcomp.server.store.interface import BlobReader


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Cursor: ...


class DeferringConnection(Connection, Protocol):
    """A connection that can hold a write back and send it with the next statement."""

    def defer(self, sql: str, params: Any = ..., /) -> None: ...

    def drop_deferred(self) -> None: ...


class Database(Protocol):
    """Connections and transactions. Any database error inside a transaction becomes a
    :class:`~vcomp.errors.StoreError` (:class:`~vcomp.errors.StoreUnavailable` when the
    database cannot be reached) and rolls the transaction back."""

    def transaction(
        self, *, write: bool = False, durable: bool = True
    ) -> AbstractContextManager[Connection]: ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...


class Blobs(Protocol):
    """Payload blobs: writes inside a caller's transaction, reads in their own."""

    def insert(self, conn: Connection, data: bytes, digest: bytes) -> int:
        """A new sealed blob holding ``data`` whose SHA-256 is ``digest``."""
        ...

    def reserve(self, conn: Connection, total: int) -> int:
        """An unsealed blob of ``total`` bytes, filled later by :meth:`write_at`."""
        ...

    def write_at(
        self, conn: Connection, blob_id: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None: ...

    def stream_in(self, conn: Connection, stream: BinaryIO, total: int) -> tuple[int, bytes]:
        """A new sealed blob of exactly ``total`` bytes read from ``stream`` in chunks;
        returns (id, SHA-256)."""
        ...

    def seal(self, conn: Connection, blob_id: int, digest: bytes) -> None: ...

    def delete(self, conn: Connection, blob_id: int) -> None: ...

    def reader(self, blob_id: int | None, size: int, sha256: bytes) -> BlobReader: ...

    def sha256(self, blob_id: int, size: int) -> bytes: ...

    def loader(self, blob_id: int | None, size: int) -> Callable[[], bytes]: ...


class Dialect(Protocol):
    """The few statements that differ between backends."""

    #: Errors of one statement that a savepoint undoes (a constraint, a bad value).
    statement_errors: tuple[type[Exception], ...]
    #: Run after a batch's jobs are inserted (refresh the planner's statistics).
    after_bulk_insert: tuple[str, ...]
    #: Tests ``{column}`` against a list parameter ``:{name}`` (made by text_list/id_list).
    in_list: str
    #: INSERT ... RETURNING in a WITH clause feeds the statement after it.
    writes_in_with: bool
    #: Pick from growing windows of the queue (see ``Leases._pick``) rather than at once.
    pick_in_windows: bool

    def lease_pick(self, window: int | None) -> str:
        """The lease pick (see :func:`~.queries.lease_pick`) over a window of the queue
        of this many jobs (with ``pick_in_windows``), or else over the whole queue."""
        ...

    def lease_window_end(self, window: int) -> str:
        """With ``pick_in_windows``: where that window ends and how many jobs it holds
        (see :func:`~.queries.lease_window_end`)."""
        ...

    def defer(self, conn: Connection, sql: str, params: Any) -> None:
        """Run a write whose result (row count, rows) nobody reads, now or, where the
        backend can, together with the next statement (one round trip for both). A
        database error it raises may surface from that next statement."""
        ...

    def rollback_to(self, conn: Connection, savepoint: str) -> None:
        """Undo this transaction back to ``savepoint``, writes not yet sent included."""
        ...

    def text_list(self, values: Sequence[str]) -> object:
        """A list of strings as one parameter for the ``:kinds`` style list tests."""
        ...

    def id_list(self, values: Sequence[int]) -> object:
        """A list of ids as one parameter for :attr:`in_list`."""
        ...

    def lock_jobs(
        self, conn: Connection, job_ids: Sequence[int], *, skip_locked: bool = False
    ) -> list[int]:
        """Lock these jobs' rows for this transaction, in id order; returns the ids
        locked (with ``skip_locked``, those no other transaction holds)."""
        ...


def returning_id(cur: Cursor) -> int:
    """The id of an ``INSERT ... RETURNING id``."""
    rows = cur.fetchall()
    return int(rows[0][0])
