"""The agent's live status: a UNIX socket in its home, and the totals it keeps.

``status.sock`` (mode 0600, in the 0700 home, never on the network) answers one JSON
request line with one JSON line: ``{"command": "status" | "pause" | "resume"}``. The
peer's uid is checked too (SO_PEERCRED): only the agent's own uid or root. A bad
request gets ``{"ok": false, "error": ...}`` and the connection is closed; the agent
carries on. ``stats.json`` keeps jobs done (today and in total) and CPU-seconds donated
across restarts, replaced atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vcomp import logfmt
from vcomp.agent.spool import _write_atomically as write_atomically
from vcomp.errors import AgentUnreachable, ConfigError, loggable

if TYPE_CHECKING:
    from vcomp.agent.runtime import AgentRuntime

log = logging.getLogger("vcomp.agent.status")

MAX_REQUEST = 1024  # bytes of one request line
MAX_RESPONSE = 1 << 20
MAX_STATS_FILE = 4096
REQUEST_TIMEOUT = 5.0  # a client that says nothing is dropped
MAX_CLIENTS = 8
COMMANDS = ("status", "pause", "resume")


# ---------------------------------------------------------------------- totals


@dataclass
class AgentTotals:
    """Jobs done and CPU-seconds donated, kept in ``stats.json``."""

    jobs_total: int = 0
    jobs_today: int = 0
    day: str = ""  # ISO date that jobs_today counts
    cpu_seconds_donated: float = 0.0

    def record(self, cpu_seconds: float, today: date) -> None:
        if self.day != today.isoformat():
            self.day, self.jobs_today = today.isoformat(), 0
        self.jobs_total += 1
        self.jobs_today += 1
        self.cpu_seconds_donated = round(self.cpu_seconds_donated + max(0.0, cpu_seconds), 3)

    def today(self, today: date) -> int:
        return self.jobs_today if self.day == today.isoformat() else 0

    @classmethod
    def load(cls, path: Path) -> AgentTotals:
        """The saved totals; a missing, oversized or malformed file starts from zero."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_STATS_FILE + 1)
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            logfmt.event(log, "stats_unreadable", logging.WARNING, error=loggable(exc))
            return cls()
        try:
            if len(raw) > MAX_STATS_FILE:
                raise ValueError("file too large")
            doc = json.loads(raw)
            totals = cls(
                jobs_total=int(doc["jobs_total"]),
                jobs_today=int(doc["jobs_today"]),
                day=str(doc["day"])[:10],
                cpu_seconds_donated=float(doc["cpu_seconds_donated"]),
            )
            if totals.jobs_total < 0 or totals.jobs_today < 0 or totals.cpu_seconds_donated < 0:
                raise ValueError("negative count")
        except (ValueError, KeyError, TypeError) as exc:
            logfmt.event(log, "stats_unreadable", logging.WARNING, error=loggable(exc))
            return cls()
        return totals

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def save(self, path: Path) -> None:
        """Replace ``path`` atomically (fsynced, like the spool's files); blocking."""
        write_atomically(path, self.encode())


# ---------------------------------------------------------------------- the view


def runtime_status(rt: AgentRuntime) -> dict[str, Any]:
    """What ``vcomp-agent status`` shows: plain JSON data, no job payloads, no keys."""
    prefs = rt.config.preferences
    workers = []
    for w in rt.workers:
        session = w.session
        job = None
        if w.running is not None:
            r = w.running
            job = {
                "job": r.job,
                "attempt": r.attempt,
                "progress": r.progress,
                "cpu_seconds": round(r.control.cpu_seconds(), 3),
                "stopped": r.control.stopped,
                "waiting_for_memory": r.waiting_for_memory,
            }
        workers.append(
            {
                "worker": w.index,
                "server": w.server,
                "session": session.state.name.lower() if session is not None else "disconnected",
                "job": job,
            }
        )
    today = date.today()
    source = rt.preferences.input
    return {
        "agent": rt.config.name,
        "servers": list(rt.config.servers),
        "mode": rt.mode.kind,
        "paused": rt.hold.held,
        "paused_because": rt.hold.reasons,
        "workers": workers,
        "cpu_seconds_running": round(
            sum(w.running.control.cpu_seconds() for w in rt.workers if w.running is not None), 3
        ),
        "jobs_today": rt.totals.today(today),
        "jobs_total": rt.totals.jobs_total,
        "cpu_seconds_donated": rt.totals.cpu_seconds_donated,
        "memory_reserved": rt.memory.reserved,
        "preferences": prefs.as_dict(),
        "user_activity_source": source.source if source is not None else None,
    }


def format_status(doc: dict[str, Any]) -> str:
    """The status as a few lines for a terminal."""
    lines = [f"agent {doc.get('agent', '?')}  mode {doc.get('mode', '?')}"]
    if doc.get("paused"):
        why = "; ".join(f"{k}: {v}" for k, v in dict(doc.get("paused_because") or {}).items())
        lines.append(f"PAUSED: {why}")
    else:
        lines.append("running (not paused)")
    for w in doc.get("workers") or []:
        where = w.get("server") or "-"
        line = f"worker {w.get('worker')}: {w.get('session')} {where}"
        job = w.get("job")
        if job:
            progress = job.get("progress")
            shown = f"{progress:.0%}" if isinstance(progress, int | float) else "?"
            stopped = " (stopped)" if job.get("stopped") else ""
            if job.get("waiting_for_memory"):
                stopped = " (waiting for memory other jobs hold)"
            line += (
                f"  job {job.get('job')}/{job.get('attempt')} progress {shown} "
                f"cpu {job.get('cpu_seconds')} s{stopped}"
            )
        else:
            line += "  no job"
        lines.append(line)
    lines.append(
        f"jobs today {doc.get('jobs_today')}, total {doc.get('jobs_total')}; "
        f"CPU-seconds donated {doc.get('cpu_seconds_donated')}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- server


Handler = Callable[[str], dict[str, Any]]


class StatusServer:
    """Serves ``handler(command)`` on a 0600 UNIX socket at ``path``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.path.is_socket():
                if _answers(self.path):
                    raise OSError(f"{self.path} is in use by another running agent")
                self.path.unlink()  # left by an agent that died
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(MAX_CLIENTS)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)

    async def close(self) -> None:
        """Stop serving and remove the socket file, only if this server made it."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS:
                answer: dict[str, Any] = {"ok": False, "error": "too many status clients"}
            elif not _peer_allowed(writer):
                answer = {"ok": False, "error": "not allowed: another user's process"}
            else:
                answer = await self._answer(reader)
            writer.write(json.dumps(answer).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the client went away: nothing of the agent depends on it
        finally:
            self._clients -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
        except asyncio.LimitOverrunError:
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        except asyncio.IncompleteReadError:
            return {"ok": False, "error": "request must be one JSON line ending in a newline"}
        except TimeoutError:
            return {"ok": False, "error": "no request within the timeout"}
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: too deep
            return {"ok": False, "error": "request is not JSON"}
        command = request.get("command") if isinstance(request, dict) else None
        if command not in COMMANDS:
            return {"ok": False, "error": f"command must be one of {', '.join(COMMANDS)}"}
        try:
            return {"ok": True, **self._handler(command)}
        except Exception as exc:  # a bug here must not take the agent down
            logfmt.event(log, "status_failed", logging.ERROR, error=loggable(exc))
            return {"ok": False, "error": "the agent could not answer"}


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


# ---------------------------------------------------------------------- client


def request(path: Path, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the agent at ``path``; raises AgentUnreachable with a clear message."""
    if command not in COMMANDS:
        raise ConfigError(f"unknown status command {command!r}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentUnreachable(
                f"the agent is not running (no live status socket at {path})"
            ) from None
        except PermissionError:
            raise AgentUnreachable(f"{path}: permission denied (run as the agent's user)") from None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_RESPONSE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise AgentUnreachable(f"cannot talk to the agent at {path}: {exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise AgentUnreachable(f"the agent at {path} sent an unreadable answer") from None
    if not isinstance(answer, dict):
        raise AgentUnreachable(f"the agent at {path} sent an unreadable answer")
    if not answer.get("ok"):
        raise AgentUnreachable(f"the agent refused: {answer.get('error', 'no reason given')}")
    return answer
