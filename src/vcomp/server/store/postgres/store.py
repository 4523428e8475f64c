""":class:`PostgresStore`: the shared SQL store over a PostgreSQL database, for several
servers in front of one database (see :mod:`.database` for the connection, durability
and sync-vs-async rules, :mod:`.dialect` for the row locks)."""

from __future__ import annotations

import time
from collections.abc import Callable

from vcomp.server.store.postgres.blobs import PostgresBlobs
from vcomp.server.store.postgres.database import PostgresDatabase
from vcomp.server.store.postgres.dialect import PostgresDialect
from vcomp.server.store.records import ResultComparator
from vcomp.server.store.rules import DEFAULT_SAME_FAILURES, sha256_equal
from vcomp.server.store.sql import versions
from vcomp.server.store.sql.store import SqlStore


class PostgresStore(SqlStore):
    """The PostgreSQL job store at a libpq URL (``postgresql://user@host/db``, or a Unix
    socket: ``postgresql://user@/db?host=/socket/dir``).

    ``migrate`` (the default) creates or upgrades the schema on open; without it a
    database at another schema version is refused with an error that names
    ``vcomp-server migrate``. An unreachable database is a StoreUnavailable, at open
    and whenever no connection can be had within ``wait_timeout`` seconds.
    """

    database: PostgresDatabase

    def __init__(
        self,
        url: str,
        *,
        comparator: ResultComparator = sha256_equal,
        clock: Callable[[], float] = time.time,
        migrate: bool = True,
        max_connections: int = 8,
        wait_timeout: float = 10.0,
        same_failures: int = DEFAULT_SAME_FAILURES,
    ) -> None:
        db = PostgresDatabase(url, max_connections=max_connections, wait_timeout=wait_timeout)
        versions.ready(db, migrate=migrate)
        super().__init__(
            db,
            PostgresDialect(),
            PostgresBlobs(db),
            comparator=comparator,
            clock=clock,
            same_failures=same_failures,
        )
