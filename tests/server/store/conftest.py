"""The store fixtures, parametrised over every backend.

``backend`` is the list of backends the contract suite runs against: today SQLite
alone. A PostgreSQL backend adds a param here (and a branch in ``make_store`` and
``count_rows``); the tests themselves do not change.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.server.store.support import enroll
from vcomp.server.store import Store
from vcomp.server.store.sqlite import SqliteStore

BACKENDS = ["sqlite"]


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
def make_store(backend: str, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[Store] = []

    def make(**options: Any) -> Store:
        assert backend == "sqlite", backend
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
        assert backend == "sqlite" and isinstance(store, SqliteStore), backend
        conn = store.database.connection()
        return int(conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0])

    return count


@pytest.fixture
def agents(store: Store) -> list[str]:
    return [enroll(store, f"agent-{i}") for i in range(4)]


@pytest.fixture
def app(store: Store) -> str:
    store.add_app("pi", "python", io.BytesIO(b"print('pi')"))
    return "pi"
