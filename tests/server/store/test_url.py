"""Store URLs: which backend and file a URL names, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pg import fresh_schema_url
from tests.server.store.support import UNDO_V4
from vcomp.errors import ConfigError, SchemaVersionError, StoreError, StoreUnavailable
from vcomp.pgcluster import PostgresCluster
from vcomp.server.store import open_store
from vcomp.server.store.postgres import SCHEMA_VERSION, PostgresStore
from vcomp.server.store.sqlite import SqliteStore
from vcomp.server.store.url import migrate_store, parse_store_url, redact_store_url, sqlite_url


def test_sqlite_urls_absolute_and_relative_to_the_home(tmp_path: Path) -> None:
    assert parse_store_url("sqlite:///var/lib/vcomp/jobs.sqlite").path == Path(
        "/var/lib/vcomp/jobs.sqlite"
    )
    assert parse_store_url("sqlite:jobs.sqlite", base=tmp_path).path == tmp_path / "jobs.sqlite"
    assert parse_store_url("SQLITE:sub/j.db", base=tmp_path).path == tmp_path / "sub" / "j.db"
    assert parse_store_url("sqlite:/abs/j.db", base=tmp_path).path == Path("/abs/j.db")
    url = sqlite_url(tmp_path / "j.db")
    assert url == f"sqlite://{tmp_path}/j.db"
    assert parse_store_url(url).path == tmp_path / "j.db"
    assert str(parse_store_url(url)) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@db/jobs", "unknown store url scheme 'mysql'"),
        ("jobs.sqlite", "has no scheme"),
        ("sqlite://host/jobs.sqlite", "has no host"),
        ("sqlite:", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite:rel.db", "relative and there is no home"),
        ("postgresql:vcomp:secret@db/vcomp", "starts postgresql://"),
        ("postgresql://vcomp:secret@db/", "names no database"),
        ("postgres://vcomp:secret@db:99999/vcomp", "malformed"),
        ("postgresql://vcomp:secret@db/vc\nomp", "control character"),
    ],
)
def test_bad_urls_are_one_clear_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_store(url)
    assert "secret" not in str(caught.value)  # a password in a URL is never echoed


def test_open_store_needs_an_existing_store_and_migrate_creates_it(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "j.db")
    with pytest.raises(StoreError, match=r"no job store .*vcomp-server init"):
        open_store(url)
    assert not (tmp_path / "j.db").exists()  # refusing created nothing
    before, now = migrate_store(url)
    assert before == 0 and migrate_store(url) == (now, now)
    store = open_store(url)
    try:
        assert isinstance(store, SqliteStore)
        assert store.list_apps() == []
    finally:
        store.close()


def test_postgresql_urls_are_kept_whole_and_printed_without_the_password() -> None:
    url = "postgresql://vcomp:secret@db.example:5433/jobs?sslmode=require"
    where = parse_store_url(url)
    assert (where.scheme, where.path, str(where)) == ("postgresql", None, url)
    assert "secret" not in repr(where)
    assert redact_store_url(url) == "postgresql://vcomp@db.example:5433/jobs"
    socket = "postgres://vcomp@/vcomp?host=/tmp/x"
    assert str(parse_store_url(socket)) == socket
    assert redact_store_url(socket) == "postgres://vcomp@/vcomp"
    assert redact_store_url("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_an_unreachable_postgresql_is_one_line_without_the_url(tmp_path: Path) -> None:
    url = f"postgresql://vcomp:secret@/vcomp?host={tmp_path}"  # no server on this socket
    for attempt in (lambda: open_store(url), lambda: migrate_store(url)):
        with pytest.raises(StoreUnavailable) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith("job store unavailable: cannot connect to PostgreSQL")
        assert "\n" not in message and "secret" not in message and str(tmp_path) not in message


def test_postgresql_migrate_creates_and_open_checks_the_version(
    pg_cluster: PostgresCluster,
) -> None:
    url = fresh_schema_url(pg_cluster)
    with pytest.raises(SchemaVersionError, match=r"schema v0, older .*vcomp-server migrate"):
        open_store(url)
    assert migrate_store(url) == (0, SCHEMA_VERSION)
    assert migrate_store(url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    store = open_store(url)
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema_version() == SCHEMA_VERSION and store.list_apps() == []
        with store.database.transaction(write=True) as conn:  # back to schema v1
            conn.execute("DROP TABLE job_checkpoints")  # v7
            conn.execute("ALTER TABLE batches DROP COLUMN cancelled_at")  # v6
            conn.execute("ALTER TABLE agents DROP COLUMN revoked_at")
            conn.execute("ALTER TABLE apps DROP COLUMN retired_at")
            conn.execute("DROP TABLE api_tokens")  # v5
            for statement in UNDO_V4:
                conn.execute(statement)
            conn.execute("DROP INDEX attempts_by_server")
            conn.execute("ALTER TABLE attempts DROP COLUMN server_id")
            conn.execute("DROP TABLE servers")
            conn.execute("DROP INDEX attempts_refusals")
            conn.execute("ALTER TABLE batches DROP COLUMN disk_bytes")
            conn.execute("UPDATE schema_version SET version = 1")
    finally:
        store.close()
    with pytest.raises(SchemaVersionError, match=r"schema v1, older .*vcomp-server migrate"):
        open_store(url)
    assert migrate_store(url) == (1, SCHEMA_VERSION)
    with open_store(url) as store, store.database.transaction(write=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    for attempt in (lambda: open_store(url), lambda: migrate_store(url)):
        with pytest.raises(SchemaVersionError, match=r"schema v99, newer .*never downgrades"):
            attempt()
