"""Opening a job store from its URL, the one place that maps a URL to a backend.

URL rules
    ``sqlite:///abs/path``  an SQLite file at an absolute path (three slashes: no host).
    ``sqlite:rel/path``     an SQLite file relative to ``base`` (the server home).
    ``postgresql://...``    a PostgreSQL database, as libpq reads the URL (``postgres://``
                            too), e.g. ``postgresql://vcomp@db.example/vcomp`` or a Unix
                            socket: ``postgresql://vcomp@/vcomp?host=/run/postgresql``.
    An SQLite path is taken literally (no percent-decoding, no query string). Any other
    scheme, a host in an SQLite URL, or an empty path is a ConfigError naming the
    problem; no message ever repeats a PostgreSQL URL whole, as it may hold a password
    (:func:`redact_store_url` is what to show).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from vcomp.errors import ConfigError, StoreError
from vcomp.server.store.interface import Store
from vcomp.server.store.rules import DEFAULT_SAME_FAILURES

SQLITE = "sqlite"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed store URL; ``path`` is set (absolute) for SQLite, ``url`` (the libpq URL
    as given) for PostgreSQL. ``str()`` is the URL to open, password included."""

    scheme: str
    path: Path | None = None
    url: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.path is not None:
            return f"{SQLITE}://{self.path}"
        return self.url or f"{self.scheme}://"


def redact_store_url(url: str) -> str:
    """A store URL fit to print: a PostgreSQL URL loses its password and query."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in POSTGRES_SCHEMES:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
    except ValueError:
        return f"{scheme}://..."
    return f"{scheme}://{user}{host}{port}{parts.path}"


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
        return _postgres_url(url, scheme, rest)
    if scheme != SQLITE:
        raise ConfigError(
            f"unknown store url scheme {scheme!r}; use sqlite:///PATH, sqlite:PATH "
            "or postgresql://USER@HOST/DB"
        )
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


def _postgres_url(url: str, scheme: str, rest: str) -> StoreUrl:
    if not rest.startswith("//"):
        raise ConfigError(f"a {scheme} store url starts {scheme}://; see the libpq docs")
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ConfigError(f"a {scheme} store url holds a control character")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"the {scheme} store url is malformed (bad host or port)") from None
    if parts.path.strip("/") == "" and "dbname=" not in parts.query:
        raise ConfigError(f"the {scheme} store url names no database ({scheme}://USER@HOST/DB)")
    return StoreUrl(POSTGRES_SCHEMES[0], None, url)


def _sqlite_path(where: StoreUrl) -> Path:
    if where.scheme != SQLITE or where.path is None:
        raise ConfigError(f"no store backend for scheme {where.scheme!r}")
    return where.path


def open_store(
    url: str,
    *,
    base: Path | None = None,
    migrate: bool = False,
    busy_timeout: float = 30.0,
    same_failures: int = DEFAULT_SAME_FAILURES,
) -> Store:
    """The store at ``url``. Without ``migrate`` it must exist at this vcomp's schema
    version (else an error that names ``vcomp-server migrate``); with it, the schema
    is created or upgraded first. An unreachable database is a StoreUnavailable; on
    SQLite, so is a write that waits ``busy_timeout`` seconds for the store's lock."""
    where = parse_store_url(url, base=base)
    if where.url is not None:
        from vcomp.server.store.postgres import PostgresStore  # only opening it needs psycopg

        return PostgresStore(where.url, migrate=migrate, same_failures=same_failures)
    path = _sqlite_path(where)
    from vcomp.server.store.sqlite import SqliteStore  # only opening a store needs it

    if not migrate and not path.exists():
        raise StoreError(
            f"{path}: no job store (run `vcomp-server init` or `vcomp-server migrate`)"
        )
    return SqliteStore(
        path, migrate=migrate, busy_timeout=busy_timeout, same_failures=same_failures
    )


def migrate_store(url: str, *, base: Path | None = None) -> tuple[int, int]:
    """Create or upgrade the schema of the store at ``url``: (version before, now).

    Creates the SQLite file's directory if need be (``init --store sqlite:sub/jobs.db``).
    """
    where = parse_store_url(url, base=base)
    if where.url is not None:
        from vcomp.server.store.postgres.database import PostgresDatabase

        pg = PostgresDatabase(where.url, max_connections=1)
        try:
            return pg.migrate()
        finally:
            pg.close()
    path = _sqlite_path(where)
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
