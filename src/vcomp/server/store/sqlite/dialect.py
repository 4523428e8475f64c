"""SQLite's words for the statements that differ between backends."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from vcomp.server.store.sql.database import Connection
from vcomp.server.store.sql.queries import lease_pick

_IN_LIST = "{column} IN (SELECT value FROM json_each(:{name}))"


class SqliteDialect:
    """List parameters as JSON arrays (``json_each``); no row locks: ``BEGIN IMMEDIATE``
    already serialises every writer of the file."""

    _pick = lease_pick(
        in_list=_IN_LIST,
        whole="CAST({value} AS INTEGER)",
        greatest="MAX({a}, {b})",
    )
    statement_errors: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
    after_bulk_insert: tuple[str, ...] = ()  # SQLite's planner needs no statistics here
    in_list = _IN_LIST
    writes_in_with = False
    pick_in_windows = False  # SQLite walks jobs_queued in id order and stops at a fit

    def lease_pick(self, window: int | None) -> str:
        return self._pick

    def lease_window_end(self, window: int) -> str:
        raise NotImplementedError("SQLite picks from the whole queue")

    @staticmethod
    def defer(conn: Connection, sql: str, params: Any) -> None:
        conn.execute(sql, params)  # a local call: nothing to save by waiting

    @staticmethod
    def rollback_to(conn: Connection, savepoint: str) -> None:
        conn.execute(f"ROLLBACK TO {savepoint}")

    @staticmethod
    def text_list(values: Sequence[str]) -> object:
        return json.dumps(list(values))

    @staticmethod
    def id_list(values: Sequence[int]) -> object:
        return json.dumps(list(values))

    @staticmethod
    def lock_jobs(
        conn: Connection, job_ids: Sequence[int], *, skip_locked: bool = False
    ) -> list[int]:
        return sorted(set(job_ids))
