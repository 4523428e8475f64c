"""The SQLite job store's schema and its migrations (the SQL that reads and writes it is
shared with PostgreSQL, in :mod:`vcomp.server.store.sql`)."""

from __future__ import annotations

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
    (
        # Servers sharing the store heartbeat here; a lease names the server that issued
        # it, so the others can release it when that server falls silent.
        """CREATE TABLE servers (
            id TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            started_at REAL NOT NULL,
            last_seen REAL NOT NULL)""",
        "ALTER TABLE attempts ADD COLUMN server_id TEXT",
        "CREATE INDEX attempts_by_server ON attempts(server_id) WHERE state = 'leased'",
    ),
    (
        # Operator hooks per app version, and each done job's assimilation: due (a time
        # to call the assimilator at or after) until it returns, then assimilated_at.
        "ALTER TABLE apps ADD COLUMN validator TEXT",
        "ALTER TABLE apps ADD COLUMN assimilator TEXT",
        "ALTER TABLE jobs ADD COLUMN assimilate_due REAL",
        "ALTER TABLE jobs ADD COLUMN assimilated_at REAL",
        "ALTER TABLE jobs ADD COLUMN hook_error TEXT",
        "ALTER TABLE jobs ADD COLUMN hook_tries INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX jobs_assimilate_due ON jobs(assimilate_due) WHERE assimilate_due IS NOT NULL",
        "CREATE INDEX jobs_hook_error ON jobs(id) WHERE hook_error IS NOT NULL",
        # A validator app's pairs of replicas, judged off the writer thread: a job whose
        # ok results lack a verdict waits, validate_due set, until the hook has run.
        "ALTER TABLE jobs ADD COLUMN validate_due REAL",
        "CREATE INDEX jobs_validate_due ON jobs(validate_due) WHERE validate_due IS NOT NULL",
        """CREATE TABLE verdicts (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt_a INTEGER NOT NULL,
            attempt_b INTEGER NOT NULL,
            agree INTEGER NOT NULL,
            error TEXT,
            PRIMARY KEY (job_id, attempt_a, attempt_b))""",
    ),
    (
        # API tokens for the HTTP API: only a SHA-256 of each token is kept.
        """CREATE TABLE api_tokens (
            name TEXT PRIMARY KEY,
            scope TEXT NOT NULL CHECK (scope IN ('read', 'submit', 'admin')),
            token_sha256 BLOB NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL)""",
    ),
    (
        # A cancelled batch: its unfinished jobs were failed with reason 'cancelled'.
        "ALTER TABLE batches ADD COLUMN cancelled_at REAL",
        # A revoked agent: its key is refused at the handshake from then on.
        "ALTER TABLE agents ADD COLUMN revoked_at REAL",
        # A retired app version: batches made before keep it; no new batch may use it.
        "ALTER TABLE apps ADD COLUMN retired_at REAL",
    ),
    (
        # The latest checkpoint a job's attempt uploaded (``[jobs] upload_checkpoints``),
        # one row per job, so another agent's attempt resumes from it.
        """CREATE TABLE job_checkpoints (
            job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            blob_id INTEGER NOT NULL REFERENCES blobs(id),
            size INTEGER NOT NULL CHECK (size >= 0),
            saved_at REAL NOT NULL)""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
