"""A throwaway PostgreSQL cluster for the tests, and a fresh schema per test in it."""

from __future__ import annotations

import pytest

from vcomp.pgcluster import PostgresCluster, postgres_bindir


def skip_without_postgres() -> None:
    if postgres_bindir() is None:
        pytest.skip(
            "PostgreSQL is not installed here (no initdb and pg_ctl under "
            "/usr/lib/postgresql/*/bin or on PATH); apt-get install postgresql"
        )


def fresh_schema_url(cluster: PostgresCluster) -> str:
    """A new, empty schema in the session's cluster (see PostgresCluster)."""
    return cluster.fresh_schema_url()
