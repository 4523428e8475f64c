"""A throwaway PostgreSQL cluster for the tests, and a fresh schema per test in it."""

from __future__ import annotations

import itertools
from urllib.parse import quote

import psycopg
import pytest

from vcomp.pgcluster import PostgresCluster, postgres_bindir

_schemas = itertools.count(1)


def skip_without_postgres() -> None:
    if postgres_bindir() is None:
        pytest.skip(
            "PostgreSQL is not installed here (no initdb and pg_ctl under "
            "/usr/lib/postgresql/*/bin or on PATH); apt-get install postgresql"
        )


def fresh_schema_url(cluster: PostgresCluster) -> str:
    """The cluster's URL with its own new, empty schema first on the search path, so
    tests share one cluster and one database yet see nothing of each other."""
    name = f"t_{next(_schemas)}"
    with psycopg.connect(cluster.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{cluster.url}&options={quote(f'-csearch_path={name}')}"
