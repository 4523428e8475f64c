"""The operator commands that mirror the HTTP API: token, batch, agents, agent revoke."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.server.store.support import enroll, lease
from tests.server.test_cli import assert_clean_error, ok, run
from vcomp.server.http.auth import token_digest
from vcomp.server.store import JobState, ResultSubmission
from vcomp.server.store.sqlite import SqliteStore


@pytest.fixture
def home(tmp_path: Path) -> Path:
    ok("init", tmp_path / "srv")
    return tmp_path / "srv"


def test_token_create_prints_only_the_token_and_stores_its_hash(home: Path) -> None:
    created = ok("token", "create", "ci", "--scope", "submit", "--config", home)
    token = created.stdout.strip()
    assert token.startswith("vct_") and "\n" not in token
    store = SqliteStore(home / "jobs.sqlite")
    try:
        found = store.find_token(token_digest(token))
        assert found is not None and (found.name, found.scope) == ("ci", "submit")
    finally:
        store.close()
    assert "ci  submit" in ok("token", "list", "--config", home).stdout
    assert_clean_error(run("token", "create", "ci", "--scope", "read", "--config", home), "exists")
    ok("token", "revoke", "ci", "--config", home)
    assert "revoked" in ok("token", "list", "--config", home).stdout
    assert_clean_error(run("token", "revoke", "nobody", "--config", home), "no token")


def test_batch_cancel_and_retry(home: Path) -> None:
    store = SqliteStore(home / "jobs.sqlite")
    try:
        store.add_app("echo", "python", io.BytesIO(b"x"))
        agent = enroll(store, "volunteer")
        batch = store.create_batch("echo", [b"a", b"b", b"c"], max_attempts=1)
        failing = lease(store, agent, now=1.0)
        store.record_results(
            [ResultSubmission(failing.job_id, failing.attempt, agent, status="error", error="x")]
        )
    finally:
        store.close()
    assert ok("batch", "cancel", str(batch), "--config", home).stdout.startswith(
        f"batch {batch}: 2 unfinished jobs cancelled"
    )
    retried = ok("batch", "retry", str(batch), "--config", home)
    new = int(retried.stdout.strip())
    store = SqliteStore(home / "jobs.sqlite")
    try:
        assert store.get_batch(new).n_jobs == 1
        assert store.get_job_by_index(new, 0).state is JobState.QUEUED
    finally:
        store.close()
    assert "cancelled" in ok("status", "--config", home).stdout
    assert_clean_error(run("batch", "cancel", "99", "--config", home), "unknown batch")


def test_agents_lists_and_agent_revoke_refuses(home: Path) -> None:
    store = SqliteStore(home / "jobs.sqlite")
    try:
        agent = enroll(store, "alice")
    finally:
        store.close()
    listed = ok("agents", "--config", home).stdout
    assert "alice" in listed and "never seen" in listed and "0 jobs" in listed
    assert "revoked" in ok("agent", "revoke", "alice", "--config", home).stdout
    assert "revoked" in ok("agents", "--config", home).stdout
    store = SqliteStore(home / "jobs.sqlite")
    try:
        assert store.get_agent(agent).revoked_at is not None
    finally:
        store.close()
    assert_clean_error(run("agent", "revoke", "bob", "--config", home), "no enrolled agent")


def test_app_retire(home: Path, tmp_path: Path) -> None:
    code = tmp_path / "job.py"
    code.write_text("print(1)\n")
    for _ in range(2):
        ok("app", "add", "echo", code, "--kind", "python", "--config", home)
    assert "retired" in ok("app", "retire", "echo", "2", "--config", home).stdout
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("{}\n")
    ok("submit", "echo", "--inputs", inputs, "--config", home)  # v1: the newest not retired
    assert_clean_error(
        run("submit", "echo", "--inputs", inputs, "--app-version", "2", "--config", home),
        "is retired",
    )
    assert_clean_error(run("app", "retire", "echo", "7", "--config", home), "unknown app")
