"""status.py: the saved totals, the socket's request/answer, and the client's errors."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from vcomp.agent.status import AgentTotals, StatusServer, format_status, request
from vcomp.errors import AgentUnreachable


def test_totals_count_today_and_in_total_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    t = AgentTotals.load(path)
    t.record(1.5, date(2026, 12, 3))
    t.record(2.0, date(2026, 12, 4))
    t.record(0.25, date(2026, 12, 4))
    t.save(path)
    again = AgentTotals.load(path)
    assert again.jobs_total == 3
    assert again.today(date(2026, 12, 4)) == 2
    assert again.today(date(2026, 12, 5)) == 0
    assert again.cpu_seconds_donated == 3.75
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b'{"jobs_total": -1, "jobs_today": 0, "day": "", '
     b'"cpu_seconds_donated": 0}', b"{" + b" " * 10_000 + b"}"],
)  # fmt: skip
def test_a_bad_totals_file_starts_from_zero(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "stats.json"
    path.write_bytes(content)
    assert AgentTotals.load(path) == AgentTotals()


async def _serve(path: Path, handler: Any) -> StatusServer:
    server = StatusServer(path, handler)
    await server.start()
    return server


async def test_commands_are_answered_and_the_socket_is_0600(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(command: str) -> dict[str, Any]:
        seen.append(command)
        return {"paused": command == "pause"}

    path = tmp_path / "status.sock"
    server = await _serve(path, handler)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        answer = await asyncio.to_thread(request, path, "pause")
        assert answer == {"ok": True, "paused": True}
        assert (await asyncio.to_thread(request, path, "status"))["paused"] is False
    finally:
        await server.close()
    assert seen == ["pause", "status"]
    assert not path.exists()


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "status.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens
    server = await _serve(path, lambda c: {})
    try:
        assert (await asyncio.to_thread(request, path, "status"))["ok"] is True
    finally:
        await server.close()


def test_client_says_when_the_agent_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable, match="not running"):
        request(tmp_path / "status.sock", "status")


def test_format_status_shows_pause_reasons_and_job() -> None:
    text = format_status(
        {
            "agent": "a",
            "mode": "full",
            "paused": True,
            "paused_because": {"battery": "battery at 10%"},
            "workers": [
                {
                    "worker": 0,
                    "session": "running",
                    "server": "127.0.0.1:1",
                    "job": {"job": 4, "attempt": 1, "progress": 0.5, "cpu_seconds": 1.0},
                }
            ],
            "jobs_today": 1,
            "jobs_total": 2,
            "cpu_seconds_donated": 3.0,
        }
    )
    assert "PAUSED: battery: battery at 10%" in text
    assert "job 4/1 progress 50%" in text
    assert "CPU-seconds donated 3.0" in text
    assert json.dumps(text)  # plain text
    assert os.linesep in text or "\n" in text


async def test_a_live_socket_of_another_agent_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    first = await _serve(path, lambda c: {"who": "first"})
    try:
        second = StatusServer(path, lambda c: {"who": "second"})
        with pytest.raises(OSError, match="in use by another running agent"):
            await second.start()
        await second.close()  # as the runtime does on its way out: the file stays
        assert (await asyncio.to_thread(request, path, "status"))["who"] == "first"
    finally:
        await first.close()
