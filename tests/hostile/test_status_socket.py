"""A hostile client of the agent's status socket, against a real running agent.

Judged by side effects: another uid cannot connect (so cannot pause the agent or read
its status), and malformed, oversized, silent or flooding clients get clear errors while
the agent keeps answering and its hold is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from vcomp.agent.sandbox.hold import Hold
from vcomp.agent.status import MAX_REQUEST, StatusServer, request

NOBODY = 65534
# A client in plain python3 (no vcomp import), run as another uid.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(0)
try:
    s.sendall(b'{"command": "pause"}\\n')
except BrokenPipeError:
    pass  # already answered and closed
print("CONNECTED", s.recv(4096).decode().strip())
"""


@pytest.fixture
async def agent_socket():  # type: ignore[no-untyped-def]
    """A StatusServer wired to a real Hold as the runtime wires it, in a 0755 directory,
    so only the socket's own mode keeps other users out."""
    hold = Hold()

    def handler(command: str) -> dict[str, Any]:
        if command == "pause":
            hold.set("pause", "paused")
        elif command == "resume":
            hold.clear("pause")
        return {"paused": hold.held}

    # pytest's tmp_path sits under a 0700 directory; this one every user can enter.
    room = Path(tempfile.mkdtemp(prefix="vcomp-status-", dir="/tmp"))
    os.chmod(room, 0o755)
    path = room / "status.sock"
    server = StatusServer(path, handler)
    await server.start()
    try:
        yield path, hold
    finally:
        await server.close()
        shutil.rmtree(room, ignore_errors=True)


async def _as_nobody(path: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as uid 65534")
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3",
        "-c",
        CLIENT,
        str(path),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    return out.decode().strip()


async def test_another_uid_cannot_connect(agent_socket: tuple[Path, Hold]) -> None:
    path, hold = agent_socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await _as_nobody(path) == "PermissionError"
    assert not hold.held  # it could not pause the agent
    # Even with the socket made world-writable by mistake, the peer's uid is checked.
    os.chmod(path, 0o666)
    out = await _as_nobody(path)
    assert out.startswith("CONNECTED") and "not allowed" in out
    assert not hold.held


async def _raw(path: Path, payload: bytes, *, shut: bool = True) -> dict[str, Any]:
    def talk() -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError):
            s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        answer: dict[str, Any] = json.loads(data)
        return answer

    return await asyncio.to_thread(talk)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"hello\n", "not JSON"),
        (b'{"command": "rm -rf /"}\n', "command must be one of"),
        (b'["pause"]\n', "command must be one of"),
        (b'{"command": "pause"}', "one JSON line"),  # no newline, then EOF
        (b"\xff\xfe\n", "not JSON"),
        (b"[" * 1000 + b"]" * 20 + b"\n", "not JSON"),  # nested past the recursion limit
        (b"{" + b" " * (4 * MAX_REQUEST) + b"}\n", "longer than"),
    ],
)
async def test_malformed_requests_get_clear_errors_and_change_nothing(
    agent_socket: tuple[Path, Hold], payload: bytes, error: str
) -> None:
    path, hold = agent_socket
    answer = await _raw(path, payload)
    assert answer["ok"] is False and error in answer["error"]
    assert not hold.held
    assert (await asyncio.to_thread(request, path, "status"))["ok"] is True


async def test_silent_and_many_clients_do_not_stop_the_agent_answering(
    agent_socket: tuple[Path, Hold],
) -> None:
    path, hold = agent_socket
    silent = []
    for _ in range(20):  # more than MAX_CLIENTS, each saying nothing
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(str(path))
        silent.append(s)
    await asyncio.sleep(0.2)
    try:
        # The event loop still runs: a real hold change goes through meanwhile.
        hold.set("battery", "low")
        assert hold.held
        answer = await asyncio.wait_for(_raw(path, b'{"command": "resume"}\n'), 30)
        # Either answered, or told that too many clients are connected: never a hang.
        assert answer["ok"] is True or "too many" in answer["error"]
    finally:
        for s in silent:
            s.close()
    # Once the silent ones are gone (closed, or dropped after the request timeout).
    for _ in range(200):
        answer = await _raw(path, b'{"command": "status"}\n')
        if answer["ok"] or "too many" not in answer["error"]:
            break
        await asyncio.sleep(0.05)
    assert answer["ok"] is True, answer
    assert answer["paused"] is True  # the battery reason still holds
