"""The SQLite backend alone: WAL, foreign keys, the schema version and its migrations,
and durability across SIGKILL. Everything a Store does is in ../test_contract.py."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.store.support import downgrade_to_v1, enroll
from vcomp.errors import SchemaVersionError, StoreError
from vcomp.server.store import DEFAULT_DISK_BYTES, JobState, open_store
from vcomp.server.store.sqlite import SCHEMA_VERSION, SqliteStore
from vcomp.server.store.url import migrate_store, sqlite_url


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "store.db")
    yield s
    s.close()


def test_wal_mode_foreign_keys_and_idempotent_migrations(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SqliteStore(path) as s:
        assert s.journal_mode() == "wal"
        assert s.schema_version() == SCHEMA_VERSION
    with SqliteStore(path) as s:  # reopening applies nothing twice
        assert s.schema_version() == SCHEMA_VERSION
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
    raw.close()


def test_foreign_keys_are_enforced(store: SqliteStore) -> None:
    conn = store.database.connection()
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO reset_requests (agent_id, requested_at) VALUES ('nope', 0)")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE schema_version SET version = 999")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


def test_an_older_store_is_refused_until_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SqliteStore(path) as s:
        s.add_app("pi", "python", io.BytesIO(b"print(1)"))
    downgrade_to_v1(path)
    url = sqlite_url(path)
    with pytest.raises(SchemaVersionError) as caught:
        open_store(url)
    message = str(caught.value)
    assert "\n" not in message
    assert f"schema v1, older than this vcomp's v{SCHEMA_VERSION}" in message
    assert "vcomp-server migrate" in message
    raw = sqlite3.connect(path)  # refusing changed nothing
    assert raw.execute("SELECT version FROM schema_version").fetchone()[0] == 1
    raw.close()
    assert migrate_store(url) == (1, SCHEMA_VERSION)
    with open_store(url) as store:
        assert [a.name for a in store.list_apps()] == ["pi"]  # kept across the upgrade


def test_a_newer_store_is_refused_and_never_downgraded(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SqliteStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(SchemaVersionError, match=r"newer.*vcomp-server migrate"):
        open_store(sqlite_url(path))
    with pytest.raises(SchemaVersionError, match=r"newer.*vcomp-server migrate"):
        migrate_store(sqlite_url(path))
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION + 1
    raw.close()


def test_a_file_that_is_not_a_store_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="job store"):
        open_store(sqlite_url(path))


def test_memory_database_is_refused() -> None:
    with pytest.raises(StoreError, match="file path"):
        SqliteStore(":memory:")


def test_a_store_from_before_disk_bytes_gets_the_default(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SqliteStore(path).close()
    downgrade_to_v1(path)  # no disk_bytes, no refusal index, no servers
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO blobs (id, size, sha256, data) VALUES (1, 1, x'00', x'00')")
    raw.execute("INSERT INTO apps VALUES (1, 'a', 1, 'python', 1, 0)")
    raw.execute(
        "INSERT INTO batches (id, app_id, created_at, n_jobs, replicas, quorum, max_attempts, "
        "cpu_seconds, memory_bytes, wall_seconds, output_bytes) "
        "VALUES (1, 1, 0, 1, 1, 1, 3, 1, 1, 1, 0)"
    )
    raw.commit()
    raw.close()
    with SqliteStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_batch(1).limits.disk_bytes == DEFAULT_DISK_BYTES


_CHILD = textwrap.dedent(
    """
    import sys
    from vcomp.server.store import ResultSubmission
    from vcomp.server.store.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1])
    agent = sys.argv[2]
    while True:
        leases = [store.lease_next(agent, 0.0, 3600.0) for _ in range(5)]
        leases = [lease for lease in leases if lease is not None]
        if not leases:
            break
        subs = [
            ResultSubmission(l.job_id, l.attempt, agent, output=b"out-%d" % l.job_id)
            for l in leases
        ]
        store.record_results(subs)
        for l in leases:
            print("committed", l.job_id, l.attempt, flush=True)
    print("exhausted", flush=True)
    """
)


def test_committed_results_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as setup:
        setup.add_app("pi", "python", io.BytesIO(b""))
        agent = enroll(setup, "victim")
        setup.create_batch("pi", [b"%d" % i for i in range(20_000)])

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), agent],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    committed: list[tuple[int, int]] = []
    for line in child.stdout:
        word, job_text, attempt_text = line.split()
        assert word == "committed"
        committed.append((int(job_text), int(attempt_text)))
        if len(committed) == 200:
            os.kill(child.pid, signal.SIGKILL)
            break
    # Lines already in the pipe were printed after their commit as well.
    committed += [
        (int(line.split()[1]), int(line.split()[2]))
        for line in child.stdout
        if line.startswith("committed")
    ]
    child.wait()
    assert child.returncode == -signal.SIGKILL

    with SqliteStore(path) as reopened:
        for job_id, attempt in committed:
            [result] = reopened.list_results(job_id)
            assert (result.attempt, result.agent_id) == (attempt, agent)
            with reopened.open_output(job_id, attempt) as reader:
                assert reader.read(0, 100) == b"out-%d" % job_id
            assert reopened.get_job(job_id).state is JobState.DONE


_CLOSE_UNDER_A_READER = textwrap.dedent(
    """
    import sys, threading
    from vcomp.errors import StoreError
    from vcomp.server.store.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1])
    db = store.database
    running, closed = threading.Event(), threading.Event()
    outcome = []

    def hold() -> int:  # an SQL function: the statement is mid-step while it waits
        running.set()
        closed.wait(10)
        return 1

    def reader() -> None:
        conn = db.connection()
        conn.create_function("hold", 0, hold)
        try:
            with db.transaction() as conn:
                rows = conn.execute("SELECT hold() FROM jobs UNION ALL SELECT hold()").fetchall()
            outcome.append(f"read {len(rows)}")
        except StoreError as exc:
            outcome.append(f"store error {exc}")
        try:
            with db.transaction() as conn:
                conn.execute("SELECT 1")
            outcome.append("read again")
        except StoreError as exc:
            outcome.append(f"then {exc}")
        try:
            conn.execute("SELECT 1")
            outcome.append("connection still open")
        except Exception as exc:
            outcome.append(f"connection {type(exc).__name__}")

    thread = threading.Thread(target=reader)
    thread.start()
    assert running.wait(10)
    store.close()  # the reader's statement is still running
    closed.set()
    thread.join(10)
    print(" | ".join(outcome), flush=True)
    """
)


def test_closing_the_store_under_a_running_statement_waits_for_it(tmp_path: Path) -> None:
    """The server closes the store while a hook's read may be running on a pool thread;
    closing that connection under the statement used to crash the server (SIGSEGV)."""
    path = tmp_path / "store.db"
    SqliteStore(path).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _CLOSE_UNDER_A_READER, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == (
        "read 1 | then the job store is closed | connection ProgrammingError"
    ), child.stdout
