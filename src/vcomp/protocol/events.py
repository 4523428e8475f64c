"""Events the protocol core hands to the application. All immutable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobDescription:
    """What START announces about a job."""

    job: int
    attempt: int
    kind: str
    code_size: int
    code_sha256: bytes
    input_size: int
    input_sha256: bytes
    cpu_seconds: int
    memory_bytes: int
    wall_seconds: int
    output_bytes: int
    disk_bytes: int
    checkpoint_bytes: int = 0
    """Largest checkpoint the server takes for this attempt; 0: it takes none."""
    resume_attempt: int = 0
    """The earlier attempt the resume state comes from (when ``resume_size``)."""
    resume_size: int = 0
    resume_sha256: bytes = b""
    """Set exactly when a resume state follows the input (which may be empty)."""

    @property
    def transfer_size(self) -> int:
        """Bytes of the CODE stream: code, input, then the resume state."""
        return self.code_size + self.input_size + self.resume_size


# ---- both sides -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    session_id: int
    agent_id: bytes
    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class SessionClosed:
    session_id: int
    reason: str
    code: int


# ---- server side ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeRejected:
    """The server refused an agent; ``reason`` is the verifier's reason string."""

    agent_id: bytes
    address: tuple[str, int]
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class AgentIdle:
    """The agent can take a job now (after READY or after a committed result)."""

    session_id: int


@dataclass(frozen=True, slots=True)
class JobDelivered:
    """Every CODE packet and END were acknowledged."""

    session_id: int
    job: int
    attempt: int


@dataclass(frozen=True, slots=True)
class ResultChunk:
    session_id: int
    job: int
    attempt: int
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResultComplete:
    """The last RESULT chunk arrived and the SHA-256 over all chunks matched."""

    session_id: int
    agent_id: bytes
    job: int
    attempt: int
    total: int
    sha256: bytes
    status: str
    detail: str
    cpu_ms: int
    wall_ms: int


@dataclass(frozen=True, slots=True)
class CheckpointChunk:
    """Part of a running job's checkpoint; the whole is only good once it completes."""

    session_id: int
    job: int
    attempt: int
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CheckpointComplete:
    """A checkpoint's chunks all arrived and their SHA-256 matched its fin chunk."""

    session_id: int
    agent_id: bytes
    job: int
    attempt: int
    total: int


@dataclass(frozen=True, slots=True)
class JobRefused:
    """The agent reported an ERROR about a job (size/hash mismatch, sandbox...)."""

    session_id: int
    job: int
    attempt: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ResultUnverified:
    """The server refused an agent's result: its chunks do not match the size or SHA-256
    the agent declared (the agent is told with an ERROR, so it drops the result)."""

    session_id: int
    job: int
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResetDone:
    session_id: int
    epoch: int


# ---- agent side -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    session_id: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """The server refused us, or proved to be someone other than the pinned key.

    ``offered_key`` is the raw key a server offered that is not the pinned one
    (unauthenticated: only for telling the volunteer what the server presented)."""

    code: int
    reason: str
    offered_key: bytes = b""


@dataclass(frozen=True, slots=True)
class HandshakeRetry:
    """No answer yet: the handshake packet went again (``tries`` so far); the next
    try is ``next_in`` seconds away unless an answer comes."""

    tries: int
    next_in: float


@dataclass(frozen=True, slots=True)
class JobReceived:
    """A complete job whose size and hashes matched START."""

    description: JobDescription
    code: bytes
    input: bytes
    resume: bytes | None = None
    """The checkpoint of an earlier attempt the server sent, to resume from."""


@dataclass(frozen=True, slots=True)
class JobAborted:
    """A job in progress was dropped (RESET, or a bad transfer we reported)."""

    job: int
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResetReceived:
    """The server reset this session: results not yet committed must be resent."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ResultCommitted:
    job: int
    attempt: int


@dataclass(frozen=True, slots=True)
class ResultRefused:
    """The server will never accept this result (it failed verification)."""

    job: int
    attempt: int
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ResultSent:
    """Every RESULT packet of this result was acknowledged (not yet committed)."""

    job: int
    attempt: int


Event = (
    SessionEstablished
    | SessionClosed
    | HandshakeRejected
    | AgentIdle
    | JobDelivered
    | ResultChunk
    | ResultComplete
    | CheckpointChunk
    | CheckpointComplete
    | JobRefused
    | ResultUnverified
    | ResetDone
    | Connected
    | Rejected
    | HandshakeRetry
    | JobReceived
    | JobAborted
    | ResetReceived
    | ResultCommitted
    | ResultRefused
    | ResultSent
)
