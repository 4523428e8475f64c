"""Shared fixtures for the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import skip_without_postgres
from vcomp.pgcluster import PostgresCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the whole session (skips, saying why, when
    PostgreSQL is not installed); tests take a fresh schema in it (tests/pg.py)."""
    skip_without_postgres()
    with PostgresCluster() as cluster:
        yield cluster
