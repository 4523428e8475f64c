"""Opening a job store from its URL, the one place that maps a URL to a backend.

URL rules
    ``sqlite:///abs/path``  an SQLite file at an absolute path (three slashes: no host).
    ``sqlite:rel/path``     an SQLite file relative to ``base`` (the server home).
    ``postgresql://...``    the PostgreSQL backend (not built yet: a clear error).
    The path is taken literally (no percent-decoding, no query string). Any other
    scheme, a host in an SQLite URL, or an empty path is a ConfigError naming the
    problem; the error never repeats a non-SQLite URL whole, as it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vcomp.errors import ConfigError, StoreError
from vcomp.server.store.interface import Store

SQLITE = "sqlite"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed store URL; ``path`` is set (absolute) for SQLite."""

    scheme: str
    path: Path | None = None

    def __str__(self) -> str:
        return f"{SQLITE}://{self.path}" if self.path is not None else f"{self.scheme}://..."


def sqlite_url(path: Path) -> str:
    """The URL of an SQLite store file (made absolute)."""
    return f"{SQLITE}://{Path(path).absolute()}"


def parse_store_url(url: str, *, base: Path | None = None) -> StoreUrl:
    """Check a store URL; a relative SQLite path is resolved against ``base``."""
    if not isinstance(url, str) or ":" not in url:
        raise ConfigError(f"store url {url!r} has no scheme; use sqlite:///PATH or sqlite:PATH")
    scheme, rest = url.split(":", 1)
    scheme = scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        raise ConfigError(
            f"store url scheme {scheme!r}: the PostgreSQL store is not built yet; "
            "use sqlite:///PATH"
        )
    if scheme != SQLITE:
        raise ConfigError(f"unknown store url scheme {scheme!r}; use sqlite:///PATH or sqlite:PATH")
    if rest.startswith("//"):
        if not rest.startswith("///"):
            raise ConfigError(f"store url {url!r}: an SQLite url has no host; use sqlite:///PATH")
        path = Path(rest[2:])
    else:
        path = Path(rest)
    if not rest.strip("/") or "\x00" in rest:
        raise ConfigError(f"store url {url!r} names no file")
    if not path.is_absolute():
        if base is None:
            raise ConfigError(f"store url {url!r} is relative and there is no home to resolve it")
        path = Path(base) / path
    return StoreUrl(SQLITE, path.absolute())


def _sqlite_path(where: StoreUrl) -> Path:
    # The one backend so far; parse_store_url refuses the others.
    if where.scheme != SQLITE or where.path is None:
        raise ConfigError(f"no store backend for scheme {where.scheme!r}")
    return where.path


def open_store(
    url: str, *, base: Path | None = None, migrate: bool = False, busy_timeout: float = 30.0
) -> Store:
    """The store at ``url``. Without ``migrate`` it must exist at this vcomp's schema
    version (else an error that names ``vcomp-server migrate``); with it, the schema
    is created or upgraded first. A write that waits ``busy_timeout`` seconds for the
    store's lock fails with :class:`~vcomp.errors.StoreUnavailable`."""
    path = _sqlite_path(parse_store_url(url, base=base))
    from vcomp.server.store.sqlite import SqliteStore  # only opening a store needs it

    if not migrate and not path.exists():
        raise StoreError(
            f"{path}: no job store (run `vcomp-server init` or `vcomp-server migrate`)"
        )
    return SqliteStore(path, migrate=migrate, busy_timeout=busy_timeout)


def migrate_store(url: str, *, base: Path | None = None) -> tuple[int, int]:
    """Create or upgrade the schema of the store at ``url``: (version before, now).

    Creates the SQLite file's directory if need be (``init --store sqlite:sub/jobs.db``).
    """
    path = _sqlite_path(parse_store_url(url, base=base))
    from vcomp.server.store.sqlite.database import SqliteDatabase

    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the directory of {path}: {exc.strerror}") from None
    db = SqliteDatabase(path)
    try:
        return db.migrate()
    finally:
        db.close()
