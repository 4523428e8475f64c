"""The schema-version table both backends keep, and migrating by it.

``schema_version`` holds one row: how many of the backend's migrations have run.
:func:`migrate` applies the missing ones in one transaction; :func:`check_schema`
refuses a store at any other version with a :class:`~vcomp.errors.SchemaVersionError`
that names ``vcomp-server migrate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vcomp.errors import SchemaVersionError
from vcomp.server.store.sql.database import Connection, Database

MIGRATE_HINT = "run `vcomp-server migrate --config DIR`"
NEWER_HINT = "upgrade vcomp (`vcomp-server migrate` never downgrades)"
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
)


def migrate(
    db: Database,
    migrations: Sequence[Sequence[str]],
    where: str,
    *,
    first: Sequence[str] = (),
) -> tuple[int, int]:
    """Create or upgrade the schema; returns (version before, version now). ``first``
    runs before anything else in the transaction (PostgreSQL: a lock, so two servers
    migrating at once apply each migration once)."""
    target = len(migrations)
    with db.transaction(write=True) as conn:
        for statement in first:
            conn.execute(statement)
        conn.execute(VERSION_TABLE)
        current = read_version(conn)
        if current > target:
            raise SchemaVersionError(
                f"job store {where} has schema v{current}, newer than this "
                f"vcomp's v{target}; {NEWER_HINT}"
            )
        for statements in migrations[current:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (target,),
        )
    return current, target


def check_schema(db: Database, target: int, where: str, *, has_table: str) -> None:
    """Refuse a store whose schema is not version ``target``. ``has_table`` is a query
    that returns a row when the ``schema_version`` table exists."""
    with db.transaction() as conn:
        found = conn.execute(has_table).fetchone()
        current = read_version(conn) if found else 0
    if current != target:
        age = "older" if current < target else "newer"
        hint = MIGRATE_HINT if current < target else NEWER_HINT
        raise SchemaVersionError(
            f"job store {where} has schema v{current}, {age} than this vcomp's v{target}; {hint}"
        )


def read_version(conn: Connection) -> int:
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


class VersionedDatabase(Database, Protocol):
    def migrate(self) -> tuple[int, int]: ...

    def check_schema(self) -> None: ...


def ready(db: VersionedDatabase, *, migrate: bool) -> None:
    """Migrate a just-opened database, or check its version; closes it on failure."""
    try:
        if migrate:
            db.migrate()
        else:
            db.check_schema()
    except BaseException:
        db.close()
        raise
