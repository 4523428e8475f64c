"""The SQLite job store's schema, SQL, row mapping and argument checks.

Split from ``store_sqlite.py`` so that module holds only the store's behaviour. Nothing
here touches a connection except through the cursor or row it is handed.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import sqlite3
from typing import Any, BinaryIO

from vcomp.errors import StoreError
from vcomp.server.store import (
    AgentRecord,
    App,
    AppKind,
    Job,
    JobState,
    ResultSubmission,
    StoredResult,
)

#: Largest code, input or output blob (SQLite's own default limit is ~1e9 bytes).
MAX_BLOB_BYTES = 512 << 20
#: Largest output accepted inline in a ResultSubmission; bigger ones are staged.
INLINE_OUTPUT_MAX = 1 << 20
#: Largest single BlobReader.read.
MAX_READ_BYTES = 16 << 20
COPY_CHUNK = 1 << 20  # streaming granularity for add_app and SHA-256 checks
READ_AHEAD = 256 << 10  # BlobReader read-ahead: a window of CODE chunks per read
RESULTS_PAGE = 256  # iter_results page size
MAX_REPLICAS = 100
MAX_ATTEMPTS = 1000
MAX_TEXT = 1024
U64 = (1 << 64) - 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_AGENT_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"

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
ORDER BY j.id
LIMIT 1
"""
REFUSALS_SINCE = (
    "SELECT COUNT(*) FROM attempts WHERE agent_id = ? AND ended_at > ? "
    "AND state IN ('refused', 'abandoned')"
)
#: Attempts that drew on a job's budget: every lease but the agents' refusals.
CHARGED_ATTEMPTS = (
    "SELECT j.attempts - (SELECT COUNT(*) FROM attempts AS a WHERE a.job_id = j.id "
    "AND a.state IN ('refused', 'abandoned')) FROM jobs AS j WHERE j.id = ?"
)
SQLITE_INT_MAX = (1 << 63) - 1
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


# ---------------------------------------------------------------------- argument checks


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError(f"{what} must be 1-128 of [A-Za-z0-9._-], starting alphanumeric")
    return name


def check_text(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise StoreError(f"{what} must be a non-empty string")
    if len(text) > MAX_TEXT or not text.isprintable():
        raise StoreError(f"{what} must be printable and at most {MAX_TEXT} characters")
    return text


def check_int(value: int, what: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StoreError(f"{what} must be an integer in [{low}, {high}], not {value!r}")


def check_positive(value: float, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise StoreError(f"{what} must be a positive finite number, not {value!r}")


def check_finite(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StoreError(f"{what} must be a finite number, not {value!r}")


def check_size(size: int, what: str) -> None:
    if not 0 <= size <= MAX_BLOB_BYTES:
        raise StoreError(f"{what} of {size} bytes is outside [0, {MAX_BLOB_BYTES}]")


def check_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not _AGENT_ID_RE.fullmatch(agent_id.lower()):
        raise StoreError("agent id must be 64 hex digits (SHA-256 of the AK's SPKI)")
    return agent_id.lower()


def check_submission(sub: ResultSubmission) -> None:
    if sub.output is not None and sub.upload is not None:
        raise StoreError("give the output inline or as a staged upload, not both")
    if sub.output is not None and len(sub.output) > INLINE_OUTPUT_MAX:
        raise StoreError(f"inline output above {INLINE_OUTPUT_MAX} bytes; stage it instead")
    if sub.upload is not None and (sub.output_sha256 is None or len(sub.output_sha256) != 32):
        raise StoreError("a staged output needs its 32-byte output_sha256")
    if not sub.status or len(sub.status) > 64:
        raise StoreError("result status must be 1-64 characters")
    check_int(sub.cpu_ms, "cpu_ms", 0, U64 >> 1)
    check_int(sub.wall_ms, "wall_ms", 0, U64 >> 1)


def spki_der(pem: str) -> bytes:
    if not isinstance(pem, str) or len(pem) > 8192:
        raise StoreError("attestation key must be a PEM public key of at most 8 KiB")
    lines = [line.strip() for line in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        raise StoreError("attestation key must be a PEM 'PUBLIC KEY' (SubjectPublicKeyInfo)")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise StoreError("attestation key PEM body is not valid base64") from None


def stream_remaining(stream: BinaryIO) -> int:
    try:
        if not stream.seekable():
            raise StoreError("give the size of a non-seekable code stream")
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
    except OSError as exc:
        raise StoreError(f"cannot size the code stream: {exc}") from exc
    return end - here
