"""PostgreSQL's words for the statements that differ between backends.

Row locks (READ COMMITTED, the default isolation): the lease pick takes the job row
``FOR NO KEY UPDATE OF j SKIP LOCKED``, so two servers never wait on or double-lease one
job, and the NO KEY strength leaves the foreign-key checks of attempt inserts unblocked.
Every other read-then-write path locks its jobs with :meth:`lock_jobs`, in id order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

import psycopg

from vcomp.server.store.sql.database import Connection, DeferringConnection
from vcomp.server.store.sql.queries import lease_pick, lease_window_end

_IN_LIST = "{column} = ANY(:{name})"
_WHOLE = "TRUNC({value})"
LOCK_JOBS = "SELECT id FROM jobs WHERE id = ANY(?) ORDER BY id FOR NO KEY UPDATE"
LOCK_FREE_JOBS = LOCK_JOBS + " SKIP LOCKED"


class PostgresDialect:
    # A constraint, or a value PostgreSQL cannot hold (a NUL in text): the savepoint
    # undoes the one statement and the rest of the group goes on.
    statement_errors: tuple[type[Exception], ...] = (psycopg.IntegrityError, psycopg.DataError)
    # A batch adds thousands of queued jobs at once; without fresh statistics the
    # planner takes them for one row and sorts the whole queue for every lease.
    after_bulk_insert: tuple[str, ...] = ("ANALYZE jobs",)
    # The planner, misled by the product of the fit conditions' selectivities, may
    # sort every queued job per pick; a window of the queue bounds that sort. With the
    # window's size a constant, the generic plan of the prepared pick is as bounded, so
    # the pick is planned once per connection, not on every execution (1 ms).
    pick_in_windows = True
    in_list = _IN_LIST
    writes_in_with = True  # a result and its output's blob are one statement

    @staticmethod
    @functools.cache
    def lease_pick(window: int | None) -> str:
        return lease_pick(
            in_list=_IN_LIST,
            whole=_WHOLE,
            greatest="GREATEST({a}, {b})",
            lock="\nFOR NO KEY UPDATE OF j SKIP LOCKED",
            window=window,
        )

    @staticmethod
    @functools.cache
    def lease_window_end(window: int) -> str:
        return lease_window_end(in_list=_IN_LIST, whole=_WHOLE, window=window)

    @staticmethod
    def defer(conn: Connection, sql: str, params: Any) -> None:
        # Every connection the PostgreSQL database hands out can defer (PostgresConnection).
        cast(DeferringConnection, conn).defer(sql, params)

    @staticmethod
    def rollback_to(conn: Connection, savepoint: str) -> None:
        # The writes not yet sent would be undone anyway; one failing would stop the undo.
        cast(DeferringConnection, conn).drop_deferred()
        conn.execute(f"ROLLBACK TO {savepoint}")

    @staticmethod
    def text_list(values: Sequence[str]) -> object:
        return list(values)

    @staticmethod
    def id_list(values: Sequence[int]) -> object:
        return list(values)

    @staticmethod
    def lock_jobs(
        conn: Connection, job_ids: Sequence[int], *, skip_locked: bool = False
    ) -> list[int]:
        if not job_ids:
            return []
        ids = sorted(set(job_ids))
        rows = conn.execute(LOCK_FREE_JOBS if skip_locked else LOCK_JOBS, (ids,)).fetchall()
        return [int(row[0]) for row in rows]
