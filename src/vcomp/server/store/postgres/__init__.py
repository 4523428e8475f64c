"""The PostgreSQL backend of the job store: several servers share one database. The SQL
is shared with SQLite (:mod:`..sql`); this package holds the connection pool, the
schema, the row-lock dialect and the large-object blobs."""

from __future__ import annotations

from vcomp.server.store.postgres.schema import SCHEMA_VERSION
from vcomp.server.store.postgres.store import PostgresStore

__all__ = ["SCHEMA_VERSION", "PostgresStore"]
