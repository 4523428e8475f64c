"""The SQLite job store's schema and migrations, its SQL, and row mapping.

Nothing here touches a connection except through the cursor or row it is handed.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from vcomp.errors import StoreError
from vcomp.server.store.records import (
    AgentRecord,
    App,
    AppKind,
    AttemptRecord,
    AttemptState,
    Job,
    JobState,
    StoredResult,
)

READ_AHEAD = 256 << 10  # BlobReader read-ahead: a window of CODE chunks per read
RESULTS_PAGE = 256  # iter_results page size

# Each migration is a tuple of statements applied in one transaction; the version table
# says which have run, so opening a store any number of times applies each exactly once.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE blobs (
            id INTEGER PRIMARY KEY,
            size INTEGER NOT NULL CHECK (size >= 0),
            sha256 BLOB,                       -- NULL while a staged upload is open
            data BLOB NOT NULL)""",
        """CREATE TABLE apps (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('python', 'exec')),
            blob_id INTEGER NOT NULL REFERENCES blobs(id),
            created_at REAL NOT NULL,
            UNIQUE (name, version))""",
        """CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            app_id INTEGER NOT NULL REFERENCES apps(id),
            created_at REAL NOT NULL,
            n_jobs INTEGER NOT NULL,
            replicas INTEGER NOT NULL,
            quorum INTEGER NOT NULL,
            max_attempts INTEGER NOT NULL,
            cpu_seconds REAL NOT NULL,
            memory_bytes INTEGER NOT NULL,
            wall_seconds REAL NOT NULL,
            output_bytes INTEGER NOT NULL,
            deadline REAL)""",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            batch_id INTEGER NOT NULL REFERENCES batches(id),
            idx INTEGER NOT NULL,
            input_blob INTEGER NOT NULL REFERENCES blobs(id),
            state TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'failed')),
            pending INTEGER NOT NULL,
            leased INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            disagreements INTEGER NOT NULL DEFAULT 0,
            canonical_attempt INTEGER,
            reason TEXT,
            finished_at REAL,
            UNIQUE (batch_id, idx))""",
        "CREATE INDEX jobs_queued ON jobs(id) WHERE state = 'queued'",
        "CREATE INDEX jobs_by_batch_state ON jobs(batch_id, state)",
        """CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            ak_public_pem TEXT NOT NULL,
            enrolled_at REAL NOT NULL,
            last_seen REAL,
            address TEXT,
            clock INTEGER,
            reset_count INTEGER,
            restart_count INTEGER)""",
        """CREATE TABLE attempts (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            agent_id TEXT NOT NULL REFERENCES agents(id),
            state TEXT NOT NULL,
            leased_at REAL NOT NULL,
            deadline REAL NOT NULL,
            ended_at REAL,
            reason TEXT,
            PRIMARY KEY (job_id, attempt)) WITHOUT ROWID""",
        "CREATE INDEX attempts_live ON attempts(deadline) WHERE state = 'leased'",
        """CREATE TABLE results (
            job_id INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            agent_id TEXT NOT NULL REFERENCES agents(id),
            status TEXT NOT NULL,
            error TEXT NOT NULL,
            output_blob INTEGER REFERENCES blobs(id),
            output_size INTEGER NOT NULL,
            output_sha256 BLOB NOT NULL,
            cpu_ms INTEGER NOT NULL,
            wall_ms INTEGER NOT NULL,
            received_at REAL NOT NULL,
            counted INTEGER NOT NULL,
            PRIMARY KEY (job_id, attempt),
            FOREIGN KEY (job_id, attempt) REFERENCES attempts(job_id, attempt))""",
        """CREATE TABLE disagreements (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            groups INTEGER NOT NULL,
            detected_at REAL NOT NULL)""",
        """CREATE TABLE uploads (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            blob_id INTEGER NOT NULL REFERENCES blobs(id),
            total INTEGER NOT NULL,
            high_water INTEGER NOT NULL,
            created_at REAL NOT NULL,
            FOREIGN KEY (job_id, attempt) REFERENCES attempts(job_id, attempt))""",
        """CREATE TABLE measurements (
            text TEXT PRIMARY KEY,
            note TEXT NOT NULL,
            added_at REAL NOT NULL)""",
        """CREATE TABLE reset_requests (
            id INTEGER PRIMARY KEY,
            agent_id TEXT NOT NULL REFERENCES agents(id),
            requested_at REAL NOT NULL)""",
    ),
    (
        # Batches made before disk_bytes existed get the default limit.
        "ALTER TABLE batches ADD COLUMN disk_bytes INTEGER NOT NULL DEFAULT 67108864",
        "CREATE INDEX attempts_refusals ON attempts(agent_id, ended_at) "
        "WHERE state IN ('refused', 'abandoned')",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The first queued job that fits the agent's capacity (START's numbers: whole
# seconds) and that it neither holds, has done, nor has refused.
# The per-agent cap is rules.agent_attempt_cap (max(1, max_attempts - 1)) over
# rules.CHARGED_STATES; the store contract suite pins the two together.
LEASE_PICK = """
SELECT j.id, j.batch_id, j.idx, j.pending, j.attempts, bl.size, bl.sha256
FROM jobs AS j
JOIN batches AS b ON b.id = j.batch_id
JOIN apps AS ap ON ap.id = b.app_id
JOIN blobs AS code ON code.id = ap.blob_id
JOIN blobs AS bl ON bl.id = j.input_blob
WHERE j.state = 'queued'
  AND (b.deadline IS NULL OR b.deadline > :now)
  AND b.memory_bytes <= :memory_bytes
  AND CAST(b.cpu_seconds AS INTEGER) <= :cpu_seconds
  AND CAST(b.wall_seconds AS INTEGER) <= :wall_seconds
  AND b.output_bytes <= :output_bytes
  AND b.disk_bytes <= :disk_bytes
  AND code.size + bl.size <= :job_bytes
  AND ap.kind IN (SELECT value FROM json_each(:kinds))
  AND NOT EXISTS (
    SELECT 1 FROM attempts AS a
    WHERE a.job_id = j.id AND a.agent_id = :agent
      AND a.state IN ('leased', 'succeeded', 'refused'))
  AND (SELECT COUNT(*) FROM attempts AS a
       WHERE a.job_id = j.id AND a.agent_id = :agent
         AND a.state IN (SELECT value FROM json_each(:charged_states)))
      < MAX(1, b.max_attempts - 1)
ORDER BY j.id
LIMIT 1
"""
REFUSALS_SINCE = (
    "SELECT COUNT(*) FROM attempts WHERE agent_id = ? AND ended_at > ? "
    "AND state IN ('refused', 'abandoned')"
)
APP_SELECT = (
    "SELECT a.id, a.name, a.version, a.kind, b.size, b.sha256, a.created_at "
    "FROM apps AS a JOIN blobs AS b ON b.id = a.blob_id"
)
JOB_SELECT = (
    "SELECT j.id, j.batch_id, j.idx, j.state, bl.size, bl.sha256, j.attempts, j.pending, "
    "j.leased, j.disagreements, j.canonical_attempt, j.reason, j.finished_at "
    "FROM jobs AS j JOIN blobs AS bl ON bl.id = j.input_blob"
)
RESULT_SELECT = (
    "SELECT job_id, attempt, agent_id, status, error, output_size, output_sha256, cpu_ms, "
    "wall_ms, received_at, counted FROM results"
)
ATTEMPT_SELECT = (
    "SELECT job_id, attempt, agent_id, state, leased_at, deadline, ended_at, reason FROM attempts"
)
#: One attempt with its job's state, batch and waiting replica slots.
ATTEMPT_WITH_JOB = (
    "SELECT a.job_id, a.attempt, a.agent_id, a.state, a.leased_at, a.deadline, a.ended_at, "
    "a.reason, j.state, j.batch_id, j.pending FROM attempts AS a JOIN jobs AS j "
    "ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?"
)
AGENT_SELECT = "SELECT id, name, ak_public_pem, enrolled_at, last_seen, address FROM agents"


# ---------------------------------------------------------------------- row mapping


def app_from_row(row: Any) -> App:
    return App(
        app_id=int(row[0]),
        name=str(row[1]),
        version=int(row[2]),
        kind=AppKind(row[3]),
        size=int(row[4]),
        sha256=bytes(row[5]),
        created_at=float(row[6]),
    )


def job_from_row(row: Any) -> Job:
    return Job(
        job_id=int(row[0]),
        batch_id=int(row[1]),
        index=int(row[2]),
        state=JobState(row[3]),
        input_size=int(row[4]),
        input_sha256=bytes(row[5]),
        attempts=int(row[6]),
        pending=int(row[7]),
        leased=int(row[8]),
        disagreements=int(row[9]),
        canonical_attempt=None if row[10] is None else int(row[10]),
        reason=None if row[11] is None else str(row[11]),
        finished_at=None if row[12] is None else float(row[12]),
    )


def result_from_row(row: Any) -> StoredResult:
    return StoredResult(
        job_id=int(row[0]),
        attempt=int(row[1]),
        agent_id=str(row[2]),
        status=str(row[3]),
        error=str(row[4]),
        output_size=int(row[5]),
        output_sha256=bytes(row[6]),
        cpu_ms=int(row[7]),
        wall_ms=int(row[8]),
        received_at=float(row[9]),
        counted=bool(row[10]),
    )


def attempt_from_row(row: Any) -> AttemptRecord:
    return AttemptRecord(
        job_id=int(row[0]),
        attempt=int(row[1]),
        agent_id=str(row[2]),
        state=AttemptState(row[3]),
        leased_at=float(row[4]),
        deadline=float(row[5]),
        ended_at=None if row[6] is None else float(row[6]),
        reason=None if row[7] is None else str(row[7]),
    )


def agent_from_row(row: Any) -> AgentRecord:
    return AgentRecord(
        agent_id=str(row[0]),
        name=str(row[1]),
        ak_public_pem=str(row[2]),
        enrolled_at=float(row[3]),
        last_seen=None if row[4] is None else float(row[4]),
        address=None if row[5] is None else str(row[5]),
    )


def rowid(cur: sqlite3.Cursor) -> int:
    rowid = cur.lastrowid
    if rowid is None:  # pragma: no cover - sqlite3 always sets it after INSERT
        raise StoreError("insert returned no row id")
    return rowid
