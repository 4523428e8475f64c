"""The store fixtures, parametrised over every backend.

``BACKENDS`` is the list of backends the contract suite runs against. A backend adds a
param here and a branch in ``make_store``; the tests themselves do not change. Each
PostgreSQL test gets a fresh schema in the session's throwaway cluster
(``pg_cluster`` in tests/conftest.py), so tests stay independent; without PostgreSQL
installed, its params skip and say why.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.pg import fresh_schema_url
from tests.server.store.support import enroll
from vcomp.server.store import Store
from vcomp.server.store.sql.store import SqlStore
from vcomp.server.store.sqlite import SqliteStore

BACKENDS = ["sqlite", "postgresql"]


class StoreFactory(Protocol):
    """Opens a fresh store of the backend under test (closed at teardown)."""

    def __call__(self, **options: Any) -> Store: ...


#: Rows in a table of the store, optionally only those matching a WHERE clause: lets a
#: contract test check that nothing was left behind, whatever the backend.
RowCounter = Callable[..., int]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    opened: list[Store] = []
    if backend == "postgresql":
        from vcomp.server.store.postgres import PostgresStore

        cluster = request.getfixturevalue("pg_cluster")

    def make(**options: Any) -> Store:
        store: Store
        if backend == "postgresql":
            store = PostgresStore(fresh_schema_url(cluster), max_connections=4, **options)
        else:
            store = SqliteStore(tmp_path / f"store-{len(opened)}.db", **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    """An empty store (no app; unlike tests/server/conftest.py's)."""
    return make_store()


@pytest.fixture
def count_rows(backend: str, store: Store) -> RowCounter:
    def count(table: str, where: str = "1 = 1") -> int:
        assert isinstance(store, SqlStore), backend
        with store.database.transaction() as conn:
            row = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()
        return int(row[0])

    return count


@pytest.fixture
def agents(store: Store) -> list[str]:
    return [enroll(store, f"agent-{i}") for i in range(4)]


@pytest.fixture
def app(store: Store) -> str:
    store.add_app("pi", "python", io.BytesIO(b"print('pi')"))
    return "pi"
