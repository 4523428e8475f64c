"""Scale: 300 protocol-only agents in this one process hold sessions to one server at once.

Each agent holds its job's answer until every agent holds a job, so at that
moment 300 sessions are established and each has a job in flight. (A
:class:`~vcomp.loadgen.LiteAgent` answers at once, so the scheduler could give
one of them two jobs and another none; this agent is LiteAgent's patient twin,
built on the same AgentSession and asyncio adapter.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.conftest import Lab, echo_reference, wait_until
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import echo_digest
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentSession
from vcomp.transport import AgentAdapter, open_agent

AGENTS = 300


class HoldingAgent:
    def __init__(
        self, tpm: SimulatedTpm, pinned: bytes, server: tuple[str, int], ephemeral: Any
    ) -> None:
        self._tpm, self._pinned, self._server, self._ephemeral = tpm, pinned, server, ephemeral
        self.job: ev.JobReceived | None = None
        self.connected = self.committed = self.closed = False
        self.rejected: list[str] = []
        self.session: AgentSession | None = None
        self.adapter: AgentAdapter | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tpm = self._tpm
        session = self.session = AgentSession(
            agent_id=tpm.agent_id,
            pinned_server=self._pinned,
            quote=lambda extra, pcrs: tpm.quote(extra, pcrs),
            now=loop.time(),
            ephemeral=self._ephemeral,
        )
        self.adapter = await open_agent(session, self._on_event, *self._server)
        session.connect(loop.time())
        self.adapter.kick()

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Connected):
            self.connected = True
        elif isinstance(e, ev.JobReceived):
            assert self.job is None, "a second job while the first is unanswered"
            self.job = e
        elif isinstance(e, ev.ResultCommitted):
            self.committed = True
        elif isinstance(e, ev.Rejected):
            self.rejected.append(e.reason)
        elif isinstance(e, ev.SessionClosed):
            self.closed = True

    def answer(self) -> None:
        assert self.session is not None and self.adapter is not None and self.job is not None
        d = self.job.description
        self.session.submit_result(
            job=d.job, attempt=d.attempt, status="ok", output=echo_digest(self.job)
        )
        self.adapter.kick()

    async def stop(self) -> None:
        if self.session is not None and self.adapter is not None and not self.closed:
            self.session.close("test done", asyncio.get_running_loop().time())
            self.adapter.kick()
            await asyncio.sleep(0)
        if self.adapter is not None:
            self.adapter.close()


async def test_hundreds_of_agents_hold_sessions_at_once(lab: Lab) -> None:
    org = lab.org(per_agent=AGENTS)
    await lab.start(org)
    tpm = lab.lite_tpm(org, "shared")  # one identity for all: AK generation is slow
    code = org.add_app("echo", b"tiny job")
    await org.synced()
    agents = [
        HoldingAgent(tpm, bytes.fromhex(org.fingerprint), org.address, lab.ephemeral)
        for _ in range(AGENTS)
    ]

    async def stop_all() -> None:
        await asyncio.gather(*(a.stop() for a in agents))

    lab.on_close(stop_all)
    for a in agents:
        await a.start()

    await wait_until(
        lambda: all(a.connected for a in agents) or any(a.rejected or a.closed for a in agents),
        f"{AGENTS} agents to connect",
        120,
    )
    assert not any(a.rejected or a.closed for a in agents)
    assert org.live_sessions() == AGENTS

    inputs = [f"input {i}".encode() for i in range(AGENTS)]
    batch = org.submit("echo", inputs)
    await wait_until(
        lambda: all(a.job is not None for a in agents), "every agent to hold a job", 120
    )
    assert org.live_sessions() == AGENTS
    assert org.store.batch_status(batch).leased == AGENTS
    for a in agents:
        a.answer()

    await org.wait_batch(batch, timeout=120)
    await wait_until(lambda: all(a.committed for a in agents), "every commit to be confirmed", 60)
    outputs = org.outputs(batch)
    assert {i: out for i, (_, out) in outputs.items()} == {
        i: echo_reference(code, data) for i, data in enumerate(inputs)
    }
    assert not any(a.closed for a in agents)
    assert org.live_sessions() == AGENTS
