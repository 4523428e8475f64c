"""Helpers the store tests share: agent keys, enrolment, leases and results."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vcomp.server.store import Lease, ResultSubmission, Store


def new_agent_key() -> tuple[str, str]:
    """(agent id, AK public PEM). EC keys are fast; the store only hashes the SPKI."""
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return hashlib.sha256(der).hexdigest(), pem


def enroll(store: Store, name: str) -> str:
    agent_id, pem = new_agent_key()
    return store.enroll_agent(agent_id, pem, name).agent_id


def ok(lease: Lease, output: bytes = b"42", **kw: object) -> ResultSubmission:
    return ResultSubmission(
        lease.job_id,
        lease.attempt,
        lease.agent_id,
        output=output,
        **kw,  # type: ignore[arg-type]
    )


def lease(store: Store, agent: str, now: float = 0.0, seconds: float = 30.0) -> Lease:
    got = store.lease_next(agent, now, seconds)
    assert got is not None
    return got


# Undoes migration 4 (operator hooks) on either backend.
UNDO_V4 = (
    "DROP TABLE verdicts",
    "DROP INDEX jobs_validate_due",
    "ALTER TABLE jobs DROP COLUMN validate_due",
    "DROP INDEX jobs_hook_error",
    "DROP INDEX jobs_assimilate_due",
    *(
        f"ALTER TABLE {table} DROP COLUMN {column}"
        for table, column in (
            ("apps", "validator"),
            ("apps", "assimilator"),
            ("jobs", "assimilate_due"),
            ("jobs", "assimilated_at"),
            ("jobs", "hook_error"),
            ("jobs", "hook_tries"),
        )
    ),
)


def downgrade_to_v1(path: Path) -> None:
    """Turn a current store file back into schema 1 (before disk_bytes)."""
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE job_checkpoints")  # v7 (uploaded checkpoints)
    raw.execute("ALTER TABLE batches DROP COLUMN cancelled_at")  # v6
    raw.execute("ALTER TABLE agents DROP COLUMN revoked_at")
    raw.execute("ALTER TABLE apps DROP COLUMN retired_at")
    raw.execute("DROP TABLE api_tokens")  # v5 (tokens)
    for statement in UNDO_V4:
        raw.execute(statement)
    raw.execute("DROP INDEX attempts_by_server")  # v3
    raw.execute("ALTER TABLE attempts DROP COLUMN server_id")
    raw.execute("DROP TABLE servers")
    raw.execute("DROP INDEX attempts_refusals")  # v2
    raw.execute("ALTER TABLE batches DROP COLUMN disk_bytes")
    raw.execute("UPDATE schema_version SET version = 1")
    raw.commit()
    raw.close()
