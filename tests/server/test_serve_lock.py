"""One ``vcomp-server serve`` per SQLite store: two real server processes on one home."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcomp.errors import StoreError
from vcomp.server.config import load_server_config
from vcomp.server.serve_lock import StoreLock
from vcomp.server.service import OrganisationServer

BIN = Path(sys.executable).parent
SERVER = str(BIN / "vcomp-server")


class Serve:
    """``vcomp-server serve --config CONFIG`` as a child process."""

    def __init__(self, config: Path, stderr: Path) -> None:
        self.stderr = stderr
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [SERVER, "serve", "--config", str(config), "--http-bind", "127.0.0.1:0"],
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def first_line(self) -> str:
        """Its first stdout line ("listening on ..."), or "" once it exits without one."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        return self.proc.stdout.readline().decode() if ready else ""

    def end(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    @property
    def stderr_text(self) -> str:
        return self.stderr.read_text()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A server home on a free port, and other.toml beside it on another free port."""
    home = tmp_path / "srv"
    subprocess.run([SERVER, "init", str(home)], check=True, capture_output=True, timeout=60)
    config = home / "server.toml"
    text = re.sub(r'bind = "[^"]*"', 'bind = "127.0.0.1:0"', config.read_text())
    config.write_text(text)
    (home / "other.toml").write_text(text)
    return home


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.end(signal.SIGKILL)


def start(servers: list[Serve], config: Path) -> Serve:
    s = Serve(config, config.parent / f"stderr-{len(servers)}.log")
    servers.append(s)
    return s


def test_a_second_server_on_the_same_store_exits_with_one_line(
    home: Path, servers: list[Serve]
) -> None:
    first = start(servers, home)
    assert "listening on" in first.first_line()
    second = start(servers, home / "other.toml")
    line = second.first_line()
    assert "listening on" not in line, "a second server is serving the same jobs.sqlite"
    assert second.end() == 1
    _assert_names_holder(second, first)
    # Admin commands still work while the server holds the store.
    status = subprocess.run(
        [SERVER, "status", "--config", str(home)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert first.proc.poll() is None


def _assert_names_holder(second: Serve, first: Serve) -> None:
    text = second.stderr_text
    assert text.startswith("error: ") and text.count("\n") == 1, text
    assert "jobs.sqlite is in use by another vcomp-server" in text
    assert f"pid {first.proc.pid}" in text


def test_the_lock_ends_with_its_server_even_on_sigkill(home: Path, servers: list[Serve]) -> None:
    first = start(servers, home)
    assert "listening on" in first.first_line()
    assert first.end(signal.SIGKILL) == -signal.SIGKILL
    second = start(servers, home / "other.toml")
    assert "listening on" in second.first_line()  # no stale lock after a crash
    assert second.end() == 0
    third = start(servers, home)
    assert "listening on" in third.first_line()  # nor after a clean stop


async def test_an_in_process_server_takes_the_lock_too(home: Path) -> None:
    config = load_server_config(home)
    first = OrganisationServer(config)
    second = OrganisationServer(load_server_config(home / "other.toml"))
    try:
        await first.start()
        with pytest.raises(StoreError, match=f"pid {os.getpid()}, listening on 127.0.0.1:"):
            await second.start()
    finally:
        await second.stop()
        await first.stop()
    again = StoreLock(config.store_path)
    again.acquire("test")  # both released it
    again.release()
