"""API tokens for the HTTP API: a name, a scope, and the SHA-256 of the token.

The token itself is shown once by ``vcomp-server token create`` and never stored, so
a copy of the store does not give access to the API. Look-ups go by digest (a unique
index), so no token is compared byte by byte against another.
"""

from __future__ import annotations

from vcomp.errors import StoreError
from vcomp.server.store.checks import check_finite, check_text
from vcomp.server.store.records import SCOPES, ApiToken
from vcomp.server.store.sql.database import Database


class Tokens:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str, scope: str, token_sha256: bytes, now: float) -> ApiToken:
        name = check_text(name, "token name")
        if scope not in SCOPES:
            raise StoreError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
        if len(token_sha256) != 32:
            raise StoreError("a token digest is 32 bytes")
        check_finite(now, "now")
        with self._db.transaction(write=True) as conn:
            if conn.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a token named {name!r} exists; revoke it or pick another name")
            conn.execute(
                "INSERT INTO api_tokens (name, scope, token_sha256, created_at) "
                "VALUES (?, ?, ?, ?)",
                (name, scope, token_sha256, now),
            )
        return ApiToken(name, scope, now, None)

    def find(self, token_sha256: bytes) -> ApiToken | None:
        """The live token with this digest, or None (unknown or revoked)."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT name, scope, created_at, revoked_at FROM api_tokens "
                "WHERE token_sha256 = ? AND revoked_at IS NULL",
                (token_sha256,),
            ).fetchone()
        return None if row is None else ApiToken(row[0], row[1], row[2], row[3])

    def list(self) -> list[ApiToken]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT name, scope, created_at, revoked_at FROM api_tokens ORDER BY name"
            ).fetchall()
        return [ApiToken(r[0], r[1], r[2], r[3]) for r in rows]

    def revoke(self, name: str, now: float) -> None:
        with self._db.transaction(write=True) as conn:
            row = conn.execute(
                "SELECT revoked_at FROM api_tokens WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no token named {name!r}")
            if row[0] is None:
                conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ?", (now, name))
