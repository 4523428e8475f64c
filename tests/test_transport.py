"""The asyncio adapter on real UDP sockets: what the kernel reports reaches the core."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from vcomp.agent.measure import measured_launch
from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentSession
from vcomp.protocol.limits import HANDSHAKE_GIVE_UP
from vcomp.transport import open_agent


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_closed_server_port_ends_the_handshake_at_once(tmp_path: Path) -> None:
    """No server on the port: the kernel answers HELLO with ICMP port unreachable, and
    the handshake ends on that, not after HANDSHAKE_GIVE_UP of retries (the agent then
    tries its next server)."""
    tpm = SimulatedTpm.open(tmp_path / "tpm")
    measured_launch(tpm, {})
    loop = asyncio.get_running_loop()
    events: list[ev.Event] = []
    session = AgentSession(
        agent_id=tpm.agent_id,
        pinned_server=bytes(32),
        quote=lambda extra, pcrs: tpm.quote(extra, pcrs),
        now=loop.time(),
    )
    adapter = await open_agent(session, events.append, "127.0.0.1", closed_udp_port())
    try:
        session.connect(loop.time())
        adapter.kick()
        deadline = loop.time() + HANDSHAKE_GIVE_UP + 15  # a bound, not the oracle
        while not any(isinstance(e, ev.SessionClosed) for e in events):
            assert loop.time() < deadline, f"still waiting: {events}"
            await asyncio.sleep(0.05)
    finally:
        adapter.close()
    closed = next(e for e in events if isinstance(e, ev.SessionClosed))
    assert closed.reason == "handshake failed: the server's port is closed"
    assert any(isinstance(e, ev.Rejected) and "port is closed" in e.reason for e in events)
