"""Fixtures shared by the server tests: a real store with one app, and its committer."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vcomp.server.commit import GroupCommitter
from vcomp.server.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A store holding the app "pi" (test modules may override it)."""
    s = SqliteStore(tmp_path / "store.db")
    s.add_app("pi", "python", io.BytesIO(b"print(3.14)"))
    yield s
    s.close()


@pytest.fixture
async def committer(store: SqliteStore) -> AsyncIterator[GroupCommitter]:
    c = GroupCommitter(store)
    yield c
    await c.close()
