"""Stateless address-validation cookies (the server's RETRY).

The server answers a cookie-less HELLO with a cookie it can check later without
having stored anything: a coarse timestamp plus a MAC over the agent's address,
that timestamp and the agent's nonce. Only after the agent echoes a valid cookie
does the server allocate session state or do public-key work.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

COOKIE_LEN = 20
MAC_LEN = 16
ROTATE_SECONDS = 60.0
LIFETIME_SECONDS = 120.0

_TS = struct.Struct(">I")


def _address_bytes(address: tuple[str, int]) -> bytes:
    host, port = address[0], address[1]
    return host.encode("ascii", "replace") + b"\x00" + struct.pack(">H", port & 0xFFFF)


class CookieJar:
    """Issues and checks cookies; holds only two rotating secrets."""

    def __init__(
        self,
        now: float,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rotate_seconds: float = ROTATE_SECONDS,
        lifetime: float = LIFETIME_SECONDS,
    ) -> None:
        self._random_bytes = random_bytes
        self._rotate_seconds = rotate_seconds
        self._lifetime = lifetime
        self._current = random_bytes(32)
        self._previous: bytes | None = None
        self._rotated_at = now

    def __repr__(self) -> str:
        return "CookieJar(<secrets hidden>)"

    def _maybe_rotate(self, now: float) -> None:
        if now - self._rotated_at >= self._rotate_seconds:
            self._previous = self._current
            self._current = self._random_bytes(32)
            self._rotated_at = now

    @staticmethod
    def _mac(secret: bytes, address: tuple[str, int], stamp: bytes, nonce: bytes) -> bytes:
        msg = _address_bytes(address) + stamp + nonce
        return hmac.new(secret, msg, hashlib.sha256).digest()[:MAC_LEN]

    def issue(self, address: tuple[str, int], nonce: bytes, now: float) -> bytes:
        self._maybe_rotate(now)
        stamp = _TS.pack(int(now) & 0xFFFFFFFF)
        return stamp + self._mac(self._current, address, stamp, nonce)

    def check(self, cookie: bytes, address: tuple[str, int], nonce: bytes, now: float) -> bool:
        """True if ``cookie`` was issued to ``address`` for ``nonce`` recently."""
        self._maybe_rotate(now)
        if len(cookie) != COOKIE_LEN:
            return False
        stamp = cookie[:4]
        (issued,) = _TS.unpack(stamp)
        age = (int(now) - issued) & 0xFFFFFFFF
        if age > self._lifetime:
            return False
        tag = cookie[4:]
        ok = False
        for secret in (self._current, self._previous):
            if secret is not None and hmac.compare_digest(
                tag, self._mac(secret, address, stamp, nonce)
            ):
                ok = True
        return ok
