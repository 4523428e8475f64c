"""Another process holding SQLite's write lock: a real store outage, without mocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_HOLDER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute('BEGIN EXCLUSIVE')
print('locked', flush=True)
sys.stdin.readline()
c.execute('ROLLBACK')
"""


class HeldLock:
    """A child process holding ``BEGIN EXCLUSIVE`` on ``path`` until :meth:`release`.

    In WAL mode readers still read; every writer waits its busy timeout and fails."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "locked\n"

    def release(self) -> None:
        if self.proc.returncode is None:
            self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
