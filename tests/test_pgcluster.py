"""The throwaway PostgreSQL cluster: it starts, restarts, survives a crash, runs
unprivileged, listens on no TCP port, and leaves nothing behind."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psycopg
import pytest

from tests.pg import skip_without_postgres
from vcomp.errors import VcompError
from vcomp.pgcluster import PostgresCluster, postgres_bindir


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    skip_without_postgres()


def _query(url: str, sql: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_the_binaries_are_found() -> None:
    bindir = postgres_bindir()
    assert bindir is not None
    assert (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def test_a_cluster_starts_restarts_survives_a_kill_and_is_removed() -> None:
    cluster = PostgresCluster()
    root = cluster.root
    assert str(root).startswith("/tmp/vcomp-pg-")
    try:
        cluster.start()
        assert _query(cluster.url, "SELECT current_user") == "vcomp"
        assert _query(cluster.url, "SHOW listen_addresses") == ""  # no TCP listener
        assert _query(cluster.url, "SHOW fsync") == "on"
        pid = cluster.postmaster_pid()
        assert pid is not None
        owner = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
        expected = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert owner == expected  # PostgreSQL refuses root; it runs as nobody then
        with psycopg.connect(cluster.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (7)")
        cluster.restart("fast")
        assert cluster.postmaster_pid() != pid
        cluster.kill()
        assert not cluster.running()
        cluster.start()  # crash recovery; the committed row is there
        assert _query(cluster.url, "SELECT x FROM kept") == 7
        cluster.stop()
        assert not cluster.running()
        cluster.start()  # a second start does not initdb again
        assert _query(cluster.url, "SELECT x FROM kept") == 7
    finally:
        cluster.close()
    assert not root.exists()


def test_a_failed_start_names_the_step_and_shows_the_server_log() -> None:
    with PostgresCluster() as cluster:
        cluster.stop()
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = 'lots'\n")
        with pytest.raises(VcompError, match=r"PostgreSQL start failed") as caught:
            cluster.start()
        assert "server log" in str(caught.value) and "shared_buffers" in str(caught.value)
        with pytest.raises(VcompError, match="stop mode"):
            cluster.stop("gently")
