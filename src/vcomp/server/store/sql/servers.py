"""The servers sharing one store: each heartbeats its row, so the others can tell when
one fell silent and release the leases it issued (see ``Leases.release_orphans``)."""

from __future__ import annotations

from vcomp.server.store.checks import check_finite, check_text
from vcomp.server.store.sql.database import Database

FORGET_AFTER = 7 * 86400.0  # rows of servers silent this long are dropped

_UPSERT = (
    "INSERT INTO servers (id, address, started_at, last_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET address = excluded.address, last_seen = excluded.last_seen"
)


class Servers:
    def __init__(self, db: Database) -> None:
        self._db = db

    def alive(self, server_id: str, address: str, now: float) -> None:
        """Register or refresh a server; its loss is harmless (the next beat redoes it)."""
        server_id = check_text(server_id, "server id")
        address = check_text(address, "server address")
        check_finite(now, "now")
        with self._db.transaction(write=True, durable=False) as conn:
            conn.execute(_UPSERT, (server_id, address, now, now))
            conn.execute("DELETE FROM servers WHERE last_seen < ?", (now - FORGET_AFTER,))

    def list(self) -> list[tuple[str, str, float, float]]:
        """(id, address, started at, last seen) of every server heard from lately."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, address, started_at, last_seen FROM servers ORDER BY started_at"
            ).fetchall()
        return [(str(r[0]), str(r[1]), float(r[2]), float(r[3])) for r in rows]
