"""Store URLs: which backend and file a URL names, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcomp.errors import ConfigError, StoreError
from vcomp.server.store import open_store
from vcomp.server.store.sqlite import SqliteStore
from vcomp.server.store.url import migrate_store, parse_store_url, sqlite_url


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
        ("postgresql://vcomp:secret@db/vcomp", "PostgreSQL store is not built yet"),
        ("postgres://db/vcomp", "PostgreSQL store is not built yet"),
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
