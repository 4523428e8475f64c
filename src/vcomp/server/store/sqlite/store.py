""":class:`SqliteStore`: the embedded job store, the shared SQL store over one SQLite file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from vcomp.server.store.records import ResultComparator
from vcomp.server.store.rules import DEFAULT_SAME_FAILURES, sha256_equal
from vcomp.server.store.sql import versions
from vcomp.server.store.sql.store import SqlStore
from vcomp.server.store.sqlite.blobs import SqliteBlobs
from vcomp.server.store.sqlite.database import SqliteDatabase
from vcomp.server.store.sqlite.dialect import SqliteDialect


class SqliteStore(SqlStore):
    """The SQLite job store.

    ``migrate`` (the default) creates or upgrades the schema on open; without it a
    store at another schema version is refused with an error that names
    ``vcomp-server migrate`` (what :func:`~vcomp.server.store.open_store` does).
    """

    database: SqliteDatabase

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        comparator: ResultComparator = sha256_equal,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
        migrate: bool = True,
        same_failures: int = DEFAULT_SAME_FAILURES,
    ) -> None:
        db = SqliteDatabase(path, busy_timeout=busy_timeout)
        versions.ready(db, migrate=migrate)
        super().__init__(
            db,
            SqliteDialect(),
            SqliteBlobs(db),
            comparator=comparator,
            clock=clock,
            same_failures=same_failures,
        )

    def journal_mode(self) -> str:
        return self.database.journal_mode()
