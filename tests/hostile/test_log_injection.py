"""Text from an agent must not forge or rewrite lines of the server's log.

A hostile enrolled agent puts terminal controls (CR, ``ESC[2K``), C1 controls
and Unicode line separators into the free text the protocol carries: a job
refusal, a result's status and detail, and the reason it closes its session.
The server is a real ``vcomp-server serve`` process; the oracle is its stderr
log: no raw control character or line separator on any line, and
``splitlines()`` yields exactly one well-formed record per event.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import unicodedata
from pathlib import Path

from vcomp.protocol.messages import Error, ErrorCode, Result

from .harness import HoldingAgent, add_batch, new_tpm, start_process_org, until

FORGED = "event=result_recorded job=1 attempt=1 status=ok FORGED"
INJECTIONS = [
    f"x\r\x1b[2K2026-01-01T00:00:00.000 INFO vcomp.server {FORGED}",
    f"x\n2026-01-01T00:00:00.000 INFO vcomp.server {FORGED}",
    f"x\x85{FORGED}\u2028{FORGED}\u2029{FORGED}\x0b\x0c\x1c\x1d\x1e{FORGED}",
    f"x\x00\x07\x08\x7f\x9b2K\u202e{FORGED}",
]
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} [A-Z]+ vcomp[.\w]* event=\w+( |$)")
LINE_BREAKS = {c for c in map(chr, range(0x3000)) if len(f"a{c}b".splitlines()) > 1}


def _raw_controls(line: str) -> list[str]:
    return [
        f"U+{ord(c):04X}"
        for c in line
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") or c in LINE_BREAKS
    ]


def _closed_sessions(log_path: Path) -> int:
    return log_path.read_text(errors="replace").count("event=session_closed")


async def _inject(agent: HoldingAgent, text: str) -> None:
    """Refuse the job we hold, send a result with hostile status and detail, then leave."""
    await agent.start()
    await until(lambda: bool(agent.jobs), 20, "a job")
    d = agent.jobs[0].description
    assert agent.session is not None and agent.session.channel is not None
    assert agent.adapter is not None
    channel = agent.session.channel
    channel.send_reliable(
        Error(code=ErrorCode.SANDBOX_FAILURE, message=text, job=d.job, attempt=d.attempt)
    )
    channel.send_reliable(
        Result(
            job=d.job + 1000,
            attempt=1,
            offset=0,
            total=0,
            data=b"",
            fin=True,
            sha256=hashlib.sha256(b"").digest(),
            status=text.encode()[:32].decode(errors="ignore"),
            detail=text,
            cpu_ms=0,
            wall_ms=0,
        )
    )
    agent.adapter.kick()
    await until(lambda: channel.send_idle, 20, "the acks")
    channel.send_reliable(Error(code=ErrorCode.INTERNAL, message=text))  # closes the session
    agent.adapter.kick()


async def test_peer_text_cannot_forge_log_lines(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    org = start_process_org(tmp_path / "srv", new_tpm(tmp_path / "tpm"), log_path)
    agents: list[HoldingAgent] = []
    try:
        for n, text in enumerate(INJECTIONS, 1):
            # One job at a time: the agent's refusals must not burn the next session's job.
            add_batch(org.store, 1, tag=str(n), max_attempts=3)
            agents.append(HoldingAgent(org, org.tpm))  # type: ignore[arg-type]
            await _inject(agents[-1], text)
            await until(lambda n=n: _closed_sessions(log_path) >= n, 20, "the session to close")
        await asyncio.sleep(0.2)
    finally:
        for agent in agents:
            agent.close()
        assert org.stop() == 0
    text = log_path.read_bytes().decode("utf-8")
    lines = text.split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    dirty = {i: _raw_controls(line) for i, line in enumerate(lines) if _raw_controls(line)}
    assert dirty == {}, f"raw control characters in log lines: {dirty}"
    assert text.splitlines() == lines
    malformed = [line for line in lines if not RECORD.match(line)]
    assert malformed == []
    refusals = [line for line in lines if "event=job_refused" in line and "FORGED" in line]
    assert len(refusals) == len(INJECTIONS)  # the hostile text was logged, once per event
    messages = [line.split(" ", 3)[3] for line in lines]
    assert not any(m.startswith("event=result_recorded job=1 ") for m in messages)
