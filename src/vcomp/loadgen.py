"""Protocol-only agents for load tests, benchmarks and the scale test.

A :class:`LiteAgent` speaks the real protocol over a real UDP socket (the same
:class:`AgentSession` and adapter as ``vcomp-agent``) but answers each job
in-process with ``compute(job)`` instead of running it in the sandbox, so one
process can hold hundreds of sessions. It is not a volunteer agent: it runs
no job code.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentSession, AgentState
from vcomp.transport import AgentAdapter, open_agent

Compute = Callable[[ev.JobReceived], bytes]


def echo_digest(job: ev.JobReceived) -> bytes:
    """Default answer: SHA-256 of code || input (cheap and checkable)."""
    return hashlib.sha256(job.code + job.input).digest()


@dataclass
class LiteStats:
    connected_at: float | None = None
    jobs: int = 0
    committed: int = 0
    rejected: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


class LiteAgent:
    def __init__(
        self,
        *,
        tpm: SimulatedTpm,
        pinned: bytes,
        server: tuple[str, int],
        compute: Compute = echo_digest,
        ephemeral: tuple[rsa.RSAPrivateKey, bytes] | None = None,
        on_event: Callable[[ev.Event], None] | None = None,
    ) -> None:
        self._tpm = tpm
        self._pinned = pinned
        self._server = server
        self._compute = compute
        self._ephemeral = ephemeral
        self._on_event = on_event
        self.stats = LiteStats()
        self.session: AgentSession | None = None
        self.adapter: AgentAdapter | None = None
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.session = AgentSession(
            agent_id=self._tpm.agent_id,
            pinned_server=self._pinned,
            quote=lambda extra, pcrs: self._tpm.quote(extra, pcrs),
            now=loop.time(),
            ephemeral=self._ephemeral,
        )
        session = self.session
        self.adapter = await open_agent(session, self._handle, *self._server)
        session.connect(loop.time())
        self.adapter.kick()

    def _handle(self, e: ev.Event) -> None:
        if self._on_event is not None:
            self._on_event(e)
        session = self.session
        assert session is not None
        if isinstance(e, ev.Connected):
            self.stats.connected_at = asyncio.get_running_loop().time()
            self.connected.set()
        elif isinstance(e, ev.JobReceived):
            self.stats.jobs += 1
            d = e.description
            session.submit_result(
                job=d.job, attempt=d.attempt, status="ok", output=self._compute(e)
            )
            if self.adapter is not None:
                self.adapter.kick()
        elif isinstance(e, ev.ResultCommitted):
            self.stats.committed += 1
        elif isinstance(e, ev.Rejected):
            self.stats.rejected.append(e.reason)
        elif isinstance(e, ev.SessionClosed):
            self.stats.closed.append(e.reason)
            self.closed.set()

    @property
    def ready(self) -> bool:
        return self.session is not None and self.session.state is AgentState.READY

    async def stop(self) -> None:
        session, adapter = self.session, self.adapter
        if session is not None and adapter is not None and session.state is not AgentState.CLOSED:
            session.close("load generator done", asyncio.get_running_loop().time())
            adapter.kick()
            await asyncio.sleep(0)
        if self.adapter is not None:
            self.adapter.close()
