"""Bearer tokens: making them, and checking a request's token against a scope.

A token is ``vct_`` and 43 characters of URL-safe base64 (32 random bytes). The store
keeps its SHA-256 only and finds it by that digest, so no stored secret is compared
with the presented one.
"""

from __future__ import annotations

import hashlib
import secrets

from aiohttp import web

from vcomp.server.http.errors import HttpError
from vcomp.server.store.records import SCOPES, ApiToken

TOKEN_PREFIX = "vct_"  # noqa: S105  a prefix, not a secret
MAX_TOKEN_CHARS = 128  # longer is not one of ours; refused before hashing


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def scope_allows(held: str, needed: str) -> bool:
    return SCOPES.index(held) >= SCOPES.index(needed)


def presented_token(request: web.Request) -> str:
    """The bearer token of ``request``; HttpError 401 when there is none or it is malformed."""
    header = request.headers.get("Authorization")
    if header is None:
        raise HttpError(401, "missing_token", "send Authorization: Bearer TOKEN")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise HttpError(401, "missing_token", "the Authorization header must be 'Bearer TOKEN'")
    if len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
        raise HttpError(401, "bad_token", "unknown or revoked token")
    return token


def check_scope(token: ApiToken | None, needed: str) -> ApiToken:
    if token is None:
        raise HttpError(401, "bad_token", "unknown or revoked token")
    if not scope_allows(token.scope, needed):
        raise HttpError(
            403, "wrong_scope", f"this needs a {needed!r} token; {token.name!r} is {token.scope!r}"
        )
    return token
