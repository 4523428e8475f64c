"""The embedded SQLite backend of the job store (see :mod:`.database` for its thread,
durability and schema rules; the SQL itself is shared, in :mod:`..sql`)."""

from __future__ import annotations

from vcomp.server.store.checks import INLINE_OUTPUT_MAX, MAX_BLOB_BYTES
from vcomp.server.store.sqlite.schema import SCHEMA_VERSION
from vcomp.server.store.sqlite.store import SqliteStore

__all__ = ["INLINE_OUTPUT_MAX", "MAX_BLOB_BYTES", "SCHEMA_VERSION", "SqliteStore"]
