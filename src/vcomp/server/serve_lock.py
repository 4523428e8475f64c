"""One server per SQLite job store: an exclusive ``flock`` beside the database.

Two ``serve`` processes on one ``jobs.sqlite`` (say, a second toml in the same home
on another port) would each discard the other's staged uploads at start and
reissue each other's leases. The server holds ``jobs.sqlite.lock`` for its
lifetime; a second one stops with one line that names the holder. The kernel drops
the lock when the holder dies, so a crash never leaves a stale lock behind (the
file itself stays; only the lock on it counts). Admin commands do not take it: they
are short transactions that SQLite already serialises with the server's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from vcomp.errors import StoreError

MAX_HOLDER_TEXT = 200


class StoreLock:
    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.path = store_path.with_name(store_path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, holder: str) -> None:
        """Take the lock and record ``holder``; StoreError if another server has it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the store lock: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _holder_text(fd)
            os.close(fd)
            raise StoreError(
                f"{self.store_path} is in use by another vcomp-server ({other}); "
                "stop it first, or give this server its own home"
            ) from None
        self._fd = fd
        self.describe(holder)

    def describe(self, holder: str) -> None:
        """Say who holds the lock (read by a second server to name it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # only the message would be poorer
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, holder.encode()[:MAX_HOLDER_TEXT], 0)

    def release(self) -> None:
        # The file stays: unlinking it would let a third server lock a fresh inode
        # while a second one still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, MAX_HOLDER_TEXT, 0)
    except OSError:
        raw = b""
    text = "".join(c if c.isprintable() else "?" for c in raw.decode("utf-8", "replace"))
    return text.strip() or "holder unknown"
