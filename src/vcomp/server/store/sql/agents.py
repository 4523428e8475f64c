"""Agents, their TPM clocks, the measurement allowlist and reset requests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from vcomp.errors import StoreError
from vcomp.server.store.checks import (
    MAX_TEXT,
    U64,
    check_agent_id,
    check_finite,
    check_int,
    check_text,
    spki_der,
)
from vcomp.server.store.records import AgentClock, AgentCredit, AgentRecord, Measurement
from vcomp.server.store.sql.database import Connection, Database
from vcomp.server.store.sql.queries import AGENT_SELECT, agent_from_row


class Agents:
    """Agent enrolment and bookkeeping, the measurement allowlist and reset requests."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._known: set[str] = set()

    # ------------------------------------------------------------------ agents

    def enroll_agent(self, agent_id: str, ak_public_pem: str, name: str) -> AgentRecord:
        """Register an agent's attestation key. Re-enrolling the same key renames it."""
        agent_id = check_agent_id(agent_id)
        name = check_text(name, "agent name")
        der = spki_der(ak_public_pem)
        if hashlib.sha256(der).hexdigest() != agent_id:
            raise StoreError("agent id is not the SHA-256 of the attestation key's SPKI")
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO agents (id, name, ak_public_pem, enrolled_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (agent_id, name, ak_public_pem.strip() + "\n", self._clock()),
            )
            return self._agent(conn, agent_id)

    def get_agent(self, agent_id: str) -> AgentRecord:
        agent = self.find_agent(agent_id)
        if agent is None:
            raise StoreError(f"unknown agent {agent_id[:16]}")
        return agent

    def find_agent(self, agent_id: str) -> AgentRecord | None:
        with self._db.transaction() as conn:
            row = conn.execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        return None if row is None else agent_from_row(row)

    def _agent(self, conn: Connection, agent_id: str) -> AgentRecord:
        row = conn.execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown agent {agent_id[:16]}")
        return agent_from_row(row)

    def known(self, conn: Connection, agent_id: str) -> str:
        """The agent id, if it is enrolled. Agents are never deleted, so an id once
        found is remembered (a lease then needs no round trip to check it)."""
        if agent_id in self._known:
            return agent_id
        if conn.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is None:
            raise StoreError(f"unknown agent {str(agent_id)[:16]}")
        self._known.add(agent_id)
        return agent_id

    def list_agents(self) -> list[AgentRecord]:
        with self._db.transaction() as conn:
            rows = conn.execute(AGENT_SELECT + " ORDER BY name, id").fetchall()
        return [agent_from_row(r) for r in rows]

    def revoke(self, agent_id: str, now: float) -> AgentRecord:
        """Refuse this agent's key from now on (revoking twice keeps the first time)."""
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            cur = conn.execute(
                "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now, agent_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown agent {agent_id[:16]}")
            row = conn.execute(AGENT_SELECT + " WHERE id = ?", (agent_id,)).fetchone()
        return agent_from_row(row)

    def credit(self) -> dict[str, AgentCredit]:
        """Per agent: counted ok results and their CPU time (BOINC's credit, in seconds)."""
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT agent_id, COUNT(*), COALESCE(SUM(cpu_ms), 0) FROM results "
                "WHERE counted = 1 AND status = 'ok' GROUP BY agent_id"
            ).fetchall()
        return {r[0]: AgentCredit(int(r[1]), int(r[2]) / 1000) for r in rows}

    def set_agent_clock(
        self, agent_id: str, clock: int, reset_count: int, restart_count: int
    ) -> None:
        check_int(clock, "clock", 0, U64)
        check_int(reset_count, "reset_count", 0, (1 << 32) - 1)
        check_int(restart_count, "restart_count", 0, (1 << 32) - 1)
        # SQLite integers are signed 64-bit; store the u64 clock as its signed twin.
        signed = clock - (1 << 64) if clock >= 1 << 63 else clock
        with self._db.transaction(write=True, durable=False) as conn:
            cur = conn.execute(
                "UPDATE agents SET clock = ?, reset_count = ?, restart_count = ? WHERE id = ?",
                (signed, reset_count, restart_count, agent_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown agent {agent_id[:16]}")

    def get_agent_clock(self, agent_id: str) -> AgentClock | None:
        with self._db.transaction() as conn:
            self.known(conn, agent_id)
            row = conn.execute(
                "SELECT clock, reset_count, restart_count FROM agents WHERE id = ?", (agent_id,)
            ).fetchone()
        if row[0] is None:
            return None
        return AgentClock(int(row[0]) % (1 << 64), int(row[1]), int(row[2]))

    def touch_agent(self, agent_id: str, now: float, address: str | None) -> None:
        check_finite(now, "now")
        with self._db.transaction(write=True, durable=False) as conn:
            cur = conn.execute(
                "UPDATE agents SET last_seen = ?, address = ? WHERE id = ?",
                (now, None if address is None else address[:MAX_TEXT], agent_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown agent {agent_id[:16]}")

    # ------------------------------------------------------------------ allowlist

    def allow_measurement(self, text: str, note: str = "") -> Measurement:
        text = check_text(text, "measurement")
        note = note[:MAX_TEXT]
        added = self._clock()
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO measurements (text, note, added_at) VALUES (?, ?, ?) "
                "ON CONFLICT (text) DO UPDATE SET note = excluded.note",
                (text, note, added),
            )
            row = conn.execute(
                "SELECT text, note, added_at FROM measurements WHERE text = ?", (text,)
            ).fetchone()
        return Measurement(str(row[0]), str(row[1]), float(row[2]))

    def list_measurements(self) -> list[Measurement]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT text, note, added_at FROM measurements ORDER BY added_at, text"
            ).fetchall()
        return [Measurement(str(r[0]), str(r[1]), float(r[2])) for r in rows]

    def is_measurement_allowed(self, text: str) -> bool:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT 1 FROM measurements WHERE text = ?", (text,)).fetchone()
        return row is not None

    def remove_measurement(self, text: str) -> None:
        with self._db.transaction(write=True) as conn:
            if conn.execute("DELETE FROM measurements WHERE text = ?", (text,)).rowcount == 0:
                raise StoreError("no such measurement in the allowlist")

    # ------------------------------------------------------------------ reset requests

    def request_reset(self, agent_id: str) -> None:
        with self._db.transaction(write=True) as conn:
            self.known(conn, agent_id)
            conn.execute(
                "INSERT INTO reset_requests (agent_id, requested_at) VALUES (?, ?)",
                (agent_id, self._clock()),
            )

    def reset_requests_after(self, after: int) -> list[tuple[int, str]]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, agent_id FROM reset_requests WHERE id > ? ORDER BY id", (after,)
            ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    def newest_reset_request(self) -> int:
        with self._db.transaction() as conn:
            row = conn.execute("SELECT MAX(id) FROM reset_requests").fetchone()
        return 0 if row[0] is None else int(row[0])

    def prune_reset_requests(self, before: float) -> int:
        check_finite(before, "before")
        with self._db.transaction(write=True, durable=False) as conn:
            # The newest row stays: SQLite would reuse its id, and servers poll by id.
            cur = conn.execute(
                "DELETE FROM reset_requests WHERE requested_at < ? "
                "AND id < (SELECT MAX(id) FROM reset_requests)",
                (before,),
            )
        return int(cur.rowcount)
