"""A throwaway PostgreSQL cluster: ``initdb`` + ``pg_ctl`` on a Unix socket in a directory.

Used by the tests (a session-scoped cluster), ``make demo-cluster`` and the benchmarks.
It listens on no TCP port (``listen_addresses=''``): only a Unix socket in the cluster
directory, with ``trust`` authentication for the superuser ``vcomp``, so nothing outside
the machine reaches it and no password exists.

PostgreSQL refuses to run as root. When this process is root, initdb, pg_ctl and the
postmaster run as ``nobody`` (through ``setpriv``), and the directory (by default a
fresh ``/tmp/vcomp-pg-*``, never under a root-only directory) belongs to nobody.

Every failure is a :class:`~vcomp.errors.VcompError` naming the step that failed, with
the tail of the server log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg

from vcomp.errors import VcompError

SUPERUSER = "vcomp"
DATABASE = "vcomp"
PORT = 5432  # only names the socket file (.s.PGSQL.5432): there is no TCP listener
LOG_TAIL = 2000

# Small and quick for tests; fsync stays on (durability is part of what is tested).
SETTINGS = {
    "listen_addresses": "''",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "dynamic_shared_memory_type": "posix",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest Debian version first, then
    PATH), or None when PostgreSQL is not installed."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for found in candidates:
        bindir = Path(found)
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie holds no resources)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class PostgresCluster:
    """One throwaway cluster; a context manager that starts it and removes it at exit."""

    def __init__(self, root: Path | None = None) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise VcompError("PostgreSQL is not installed (no initdb and pg_ctl found)")
        self.bindir = bindir
        self._as_root = os.geteuid() == 0
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="vcomp-pg-", dir="/tmp"))
        self.root = Path(root).absolute()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._as_root:
            nobody = pwd.getpwnam("nobody")
            for path in (self.root, self.socket_dir):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        self.url = f"postgresql://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}"
        self._started = False
        self._schemas = 0

    # ------------------------------------------------------------------ running

    def _run(self, what: str, args: list[str], *, check: bool = True) -> str:
        argv = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            done = subprocess.run(
                argv,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VcompError(f"PostgreSQL {what} failed: {exc}{self._log_tail()}") from None
        if check and done.returncode != 0:
            output = (done.stderr or done.stdout).strip()[-LOG_TAIL:]
            raise VcompError(
                f"PostgreSQL {what} failed (exit {done.returncode}): {output}{self._log_tail()}"
            )
        return done.stdout

    def _log_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""
        return f"\n--- server log (tail) ---\n{text}" if text.strip() else ""

    def start(self) -> None:
        """initdb (the first time), start the server and wait until it accepts
        connections, and create the ``vcomp`` database (the first time)."""
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self._run(
                "initdb",
                [
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    "--no-sync",  # a throwaway cluster; the server itself keeps fsync on
                ],
            )
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write("\n# vcomp throwaway cluster\n")
                conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
                conf.write(f"port = {PORT}\n")
                for key, value in SETTINGS.items():
                    conf.write(f"{key} = {value}\n")
        self._run("start", ["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start"])
        self._started = True
        if fresh:
            self._run(
                "createdb", ["createdb", "-h", str(self.socket_dir), "-U", SUPERUSER, DATABASE]
            )

    def fresh_schema_url(self) -> str:
        """The URL with a new, empty schema first on the search path: tests and
        benchmarks share one cluster and one database yet see nothing of each other."""
        self._schemas += 1
        name = f"s{os.getpid()}_{self._schemas}"
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {name}")
        except psycopg.Error as exc:
            raise VcompError(f"PostgreSQL create schema failed: {exc}{self._log_tail()}") from None
        return f"{self.url}&options={quote(f'-csearch_path={name}')}"

    def stop(self, mode: str = "fast") -> None:
        if mode not in ("smart", "fast", "immediate"):
            raise VcompError(f"pg_ctl stop mode must be smart, fast or immediate, not {mode!r}")
        self._run("stop", ["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])
        self._started = False

    def restart(self, mode: str = "fast") -> None:
        if mode not in ("smart", "fast", "immediate"):
            raise VcompError(f"pg_ctl restart mode must be smart, fast or immediate, not {mode!r}")
        self._run(
            "restart",
            ["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "restart"],
        )
        self._started = True

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _alive(pid)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would. Its backends exit on their own; this
        waits until they have, so :meth:`start` finds no old process attached to the
        shared memory (a real crash leaves the same state once they are gone)."""
        pid = self.postmaster_pid()
        if pid is None or not _alive(pid):
            raise VcompError(f"no running PostgreSQL in {self.data}{self._log_tail()}")
        children = [p for p in _all_pids() if _parent(p) == pid]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in (pid, *children)):
            if time.monotonic() > deadline:
                raise VcompError(f"PostgreSQL processes outlived SIGKILL{self._log_tail()}")
            time.sleep(0.02)
        if _stat(pid) is not None:
            # A zombie nobody has reaped yet (our init may be slow to): PostgreSQL's
            # own lock-file checks would take it for a live postmaster, so the stale
            # lock files go, as they would once the zombie is reaped.
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            (self.socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
        self._started = False

    def close(self) -> None:
        """Stop the server (immediately if a fast stop fails) and remove the directory."""
        try:
            if self.running():
                try:
                    self.stop("fast")
                except VcompError:
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
