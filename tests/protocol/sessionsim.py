"""Full protocol sessions plugged into the seeded network simulator.

A tiny "application" on each side reacts to events the way the real server
and agent do: the server assigns queued jobs and confirms commits, the agent
computes a result (SHA-256 of code || input, reversed input) and submits it.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp.agent.measure import measured_launch
from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol.agent_session import AgentSession
from vcomp.protocol.server_endpoint import ServerEndpoint
from vcomp.protocol.trust import TrustPolicy

AGENT_ADDR = ("127.0.0.2", 40000)


def job_output(code: bytes, data: bytes) -> bytes:
    return hashlib.sha256(code + data).digest() + data[::-1]


@dataclass
class SimJob:
    job: int
    attempt: int
    code: bytes
    data: bytes
    kind: str = "python"
    checkpoint_bytes: int = 0  # offered for uploads
    resume: bytes | None = None  # an earlier attempt's state, sent after the input
    resume_attempt: int = 0

    def description(self) -> ev.JobDescription:
        return ev.JobDescription(
            job=self.job,
            attempt=self.attempt,
            kind=self.kind,
            code_size=len(self.code),
            code_sha256=hashlib.sha256(self.code).digest(),
            input_size=len(self.data),
            input_sha256=hashlib.sha256(self.data).digest(),
            cpu_seconds=10,
            memory_bytes=1 << 28,
            wall_seconds=10,
            output_bytes=1 << 20,
            disk_bytes=1 << 26,
            checkpoint_bytes=self.checkpoint_bytes,
            resume_attempt=self.resume_attempt if self.resume is not None else 0,
            resume_size=len(self.resume) if self.resume is not None else 0,
            resume_sha256=hashlib.sha256(self.resume).digest() if self.resume is not None else b"",
        )

    @property
    def stream(self) -> bytes:
        return self.code + self.data + (self.resume or b"")


@dataclass
class ServerApp:
    """A netsim endpoint wrapping a ServerEndpoint and a trivial scheduler."""

    endpoint: ServerEndpoint = field(init=False)
    signing_key: Ed25519PrivateKey
    trust: TrustPolicy
    queue: deque[SimJob] = field(default_factory=deque)
    jobs: dict[tuple[int, int], SimJob] = field(default_factory=dict)
    results: dict[tuple[int, int], bytes] = field(default_factory=dict)
    uploads: dict[tuple[int, int], bytearray] = field(default_factory=dict)
    checkpoint_parts: dict[tuple[int, int], bytearray] = field(default_factory=dict)
    checkpoints: list[tuple[tuple[int, int], bytes]] = field(default_factory=list)
    events: list[ev.Event] = field(default_factory=list)
    commit_count: dict[tuple[int, int], int] = field(default_factory=dict)
    window: int = 64
    congestion: str = "newreno"
    auto_commit: bool = True
    address: tuple[str, int] = AGENT_ADDR
    idle: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.endpoint = ServerEndpoint(
            signing_key=self.signing_key,
            trust=self.trust,
            code_source=self._code,
            now=0.0,
            window=self.window,
            congestion=self.congestion,
        )

    def _code(self, job: int, attempt: int, offset: int, length: int) -> bytes:
        return self.jobs[(job, attempt)].stream[offset : offset + length]

    def receive(self, datagram: bytes, now: float) -> None:
        self.endpoint.receive_datagram(datagram, self.address, now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        self._react(now)
        return [d for d, _ in self.endpoint.datagrams_to_send(now)]

    def timer(self) -> float | None:
        return self.endpoint.get_timer()

    def handle_timer(self, now: float) -> None:
        self.endpoint.handle_timer(now)

    def _react(self, now: float) -> None:
        while (e := self.endpoint.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, ev.AgentIdle):
                self.idle.add(e.session_id)
            elif isinstance(e, ev.ResultChunk):
                buf = self.uploads.setdefault((e.job, e.attempt), bytearray())
                assert len(buf) == e.offset
                buf += e.data
            elif isinstance(e, ev.CheckpointChunk):
                buf = self.checkpoint_parts.setdefault((e.job, e.attempt), bytearray())
                assert len(buf) == e.offset
                buf += e.data
            elif isinstance(e, ev.CheckpointComplete):
                key = (e.job, e.attempt)
                self.checkpoints.append((key, bytes(self.checkpoint_parts.pop(key, b""))))
            elif isinstance(e, ev.ResultComplete):
                key = (e.job, e.attempt)
                self.results[key] = bytes(self.uploads.pop(key, b""))
                self.commit_count[key] = self.commit_count.get(key, 0) + 1
                if self.auto_commit:
                    s = self.endpoint.session(e.session_id)
                    if s is not None:
                        s.confirm_committed([key], now)
                        self.endpoint.touch(e.session_id)
        for sid in list(self.idle):
            s = self.endpoint.session(sid)
            if s is None:
                self.idle.discard(sid)
                continue
            if self.queue:
                job = self.queue.popleft()
                self.jobs[(job.job, job.attempt)] = job
                s.start_job(job.description())
                self.endpoint.touch(sid)
                self.idle.discard(sid)

    def of_type(self, kind: type) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class AgentApp:
    """A netsim endpoint wrapping an AgentSession that 'runs' jobs instantly."""

    session: AgentSession
    events: list[ev.Event] = field(default_factory=list)
    received: list[ev.JobReceived] = field(default_factory=list)
    compute: Callable[[bytes, bytes], bytes] = job_output
    run_jobs: bool = True
    started: bool = False
    # Checkpoints the "job" saves before its result, and whether the session took each.
    checkpoint_states: list[bytes] = field(default_factory=list)
    checkpoints_taken: list[bool] = field(default_factory=list)
    while_running: Callable[[AgentSession, ev.JobReceived], None] | None = None

    def receive(self, datagram: bytes, now: float) -> None:
        self.session.receive_datagram(datagram, now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        if not self.started:
            self.started = True
            self.session.connect(now)
        while (e := self.session.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, ev.JobReceived):
                self.received.append(e)
                d = e.description
                for state in self.checkpoint_states:
                    taken = self.session.submit_checkpoint(
                        job=d.job, attempt=d.attempt, state=state
                    )
                    self.checkpoints_taken.append(taken)
                if self.while_running is not None:
                    self.while_running(self.session, e)
                if self.run_jobs:
                    self.session.submit_result(
                        job=d.job,
                        attempt=d.attempt,
                        status="ok",
                        output=self.compute(e.code, e.input),
                        cpu_ms=1,
                        wall_ms=1,
                    )
        return self.session.datagrams_to_send(now)

    def timer(self) -> float | None:
        return self.session.get_timer()

    def handle_timer(self, now: float) -> None:
        self.session.handle_timer(now)

    def of_type(self, kind: type) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class Identity:
    tpm: SimulatedTpm
    signing_key: Ed25519PrivateKey

    @property
    def fingerprint(self) -> bytes:
        return hs.key_fingerprint(hs.raw_public(self.signing_key))


def make_identity(state_dir: Path) -> Identity:
    tpm = SimulatedTpm.open(state_dir)
    measured_launch(tpm, {})
    return Identity(tpm=tpm, signing_key=Ed25519PrivateKey.generate())


def make_trust(identity: Identity, *, enrolled: bool = True, allowed: bool = True) -> TrustPolicy:
    from vcomp.agent.measure import golden_measurement

    trust = TrustPolicy()
    if enrolled:
        trust.enrolled[identity.tpm.agent_id] = identity.tpm.ak_public_key
    if allowed:
        trust.allowlist.add(golden_measurement({}))
    return trust


_EPHEMERAL = hs.generate_ephemeral()


def make_agent(
    identity: Identity,
    *,
    pinned: bytes | None = None,
    fresh_ephemeral: bool = False,
) -> AgentSession:
    return AgentSession(
        agent_id=identity.tpm.agent_id,
        pinned_server=identity.fingerprint if pinned is None else pinned,
        quote=lambda extra, pcrs: identity.tpm.quote(extra, pcrs),
        now=0.0,
        ephemeral=None if fresh_ephemeral else _EPHEMERAL,
        random_bytes=os.urandom,
    )
