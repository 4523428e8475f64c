"""The packet bodies other than CODE and ACK: one frozen dataclass per packet type.

Dataclass field order is the key order the encoder emits (PROTOCOL.md, "Bodies").
Every message validates itself on construction, so a decoded message is always
within the schema and an encoded one is always something the peer accepts. CODE
and ACK, which carry hand-written hot paths, live in :mod:`vcomp.protocol.fastpath`;
import all of them from :mod:`vcomp.protocol.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from itertools import pairwise
from typing import ClassVar, Final

from vcomp.errors import DecodeError
from vcomp.protocol import capacity, limits
from vcomp.protocol.capacity import JobCapacity
from vcomp.protocol.schema import (
    JOB_ATTEMPT,
    MAX_TRANSFER,
    SEQ_EPOCH,
    U8,
    U32,
    U64,
    Body,
    array,
    binary,
    boolean,
    choice,
    digest,
    optional,
    text,
    u8,
    u16,
    u32,
    u64,
    uint,
    validate,
)
from vcomp.protocol.wire import PacketType

__all__ = [
    "JOB_KINDS",
    "Attest",
    "Challenge",
    "Checkpoint",
    "End",
    "Error",
    "ErrorCode",
    "Hello",
    "Key",
    "Ping",
    "Pong",
    "Ready",
    "Reject",
    "Reset",
    "Result",
    "Retry",
    "Start",
]


class ErrorCode(IntEnum):
    """Numeric codes carried by REJECT and ERROR (PROTOCOL.md, "Error codes")."""

    PROTOCOL_VIOLATION = 1
    UNSUPPORTED_VERSION = 2
    ATTESTATION_FAILED = 10
    SERVER_KEY_MISMATCH = 11
    SIZE_MISMATCH = 20
    HASH_MISMATCH = 21
    JOB_TOO_LARGE = 22
    SANDBOX_FAILURE = 23
    JOB_ABANDONED = 24
    JOB_LOST = 25
    SESSION_EXPIRED = 30
    IDLE_TIMEOUT = 31
    SERVER_SHUTDOWN = 32
    AGENT_SHUTDOWN = 33
    TRANSFER_FAILED = 40
    BUSY = 41
    INTERNAL = 50


JOB_KINDS: Final = frozenset(capacity.JOB_KINDS)

_HANDSHAKE_MAX = limits.MAX_BODY

# ---- handshake (plaintext) -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Body):
    """Agent -> server: asks for a session. Sent twice: without, then with a cookie."""

    ptype: ClassVar[PacketType] = PacketType.HELLO
    versions: tuple[int, ...]
    agent: bytes
    nonce: bytes
    cookie: bytes = b""
    pad: bytes = b""

    _schema = (
        ("versions", array(u8, 1, limits.MAX_VERSIONS)),
        ("agent", digest),
        ("nonce", binary(limits.NONCE_LEN, limits.NONCE_LEN)),
        ("cookie", binary(0, limits.MAX_COOKIE)),
        ("pad", binary(0, limits.MAX_BODY)),
    )
    _max_body = _HANDSHAKE_MAX
    _min_body = limits.MIN_HELLO_BODY


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry(Body):
    """Server -> agent: the stateless address-validation cookie."""

    ptype: ClassVar[PacketType] = PacketType.RETRY
    cookie: bytes

    _schema = (("cookie", binary(1, limits.MAX_COOKIE)),)
    _max_body = _HANDSHAKE_MAX


_pcr_indices = array(uint(limits.PCR_COUNT - 1), 1, limits.MAX_PCRS)


def _check_pcr_selection(value: object) -> None:
    _pcr_indices(value)
    assert isinstance(value, tuple)
    for lower, higher in pairwise(value):
        if not lower < higher:
            raise DecodeError("PCR indices must be strictly ascending")


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(Body):
    """Server -> agent: attestation nonce and the PCRs the quote must cover."""

    ptype: ClassVar[PacketType] = PacketType.CHALLENGE
    nonce: bytes
    pcrs: tuple[int, ...]

    _schema = (
        ("nonce", binary(limits.NONCE_LEN, limits.NONCE_LEN)),
        ("pcrs", _check_pcr_selection),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Attest(Body):
    """Agent -> server: ephemeral RSA key, the quote binding it, and PCR values."""

    ptype: ClassVar[PacketType] = PacketType.ATTEST
    ephemeral: bytes
    quote: bytes
    signature: bytes
    pcr_values: tuple[bytes, ...]

    _schema = (
        ("ephemeral", binary(1, limits.MAX_EPHEMERAL_SPKI)),
        ("quote", binary(1, limits.MAX_QUOTE)),
        ("signature", binary(1, limits.MAX_SIGNATURE)),
        ("pcr_values", array(digest, 1, limits.MAX_PCRS)),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Key(Body):
    """Server -> agent: wrapped session key, signed transcript, session parameters."""

    ptype: ClassVar[PacketType] = PacketType.KEY
    wrapped: bytes
    server_key: bytes
    signature: bytes
    window: int
    idle_timeout_ms: int

    _schema = (
        ("wrapped", binary(1, limits.MAX_WRAPPED_KEY)),
        ("server_key", binary(limits.SERVER_KEY_LEN, limits.SERVER_KEY_LEN)),
        ("signature", binary(limits.SERVER_SIGNATURE_LEN, limits.SERVER_SIGNATURE_LEN)),
        ("window", uint(limits.MAX_WINDOW, limits.MIN_WINDOW)),
        ("idle_timeout_ms", u32),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(Body):
    """Server -> agent: the handshake failed; ``code`` is an ErrorCode value."""

    ptype: ClassVar[PacketType] = PacketType.REJECT
    code: int
    reason: str

    _schema = (("code", u16), ("reason", text(limits.MAX_TEXT)))
    _max_body = _HANDSHAKE_MAX


# ---- session (encrypted) --------------------------------------------------------
# seq and epoch default to 0 so a message can be built first and numbered by the
# reliable stream later with dataclasses.replace().


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Body):
    """Agent -> server: idle and able to take ``slots`` jobs (first encrypted packet).

    It also declares the largest job the agent runs (its volunteer's limits), so
    the server leases it only jobs that fit. The defaults are the protocol's bounds.
    """

    ptype: ClassVar[PacketType] = PacketType.READY
    seq: int = 0
    epoch: int = 0
    slots: int = 1
    max_memory_bytes: int = capacity.U64
    max_cpu_seconds: int = U32
    max_wall_seconds: int = U32
    max_output_bytes: int = limits.MAX_RESULT_SIZE
    max_job_bytes: int = MAX_TRANSFER
    max_disk_bytes: int = capacity.U64
    kinds: tuple[str, ...] = capacity.JOB_KINDS

    _schema = (
        *SEQ_EPOCH,
        ("slots", uint(U8, 1)),
        ("max_memory_bytes", uint(U64, 1)),
        ("max_cpu_seconds", uint(U32, 1)),
        ("max_wall_seconds", uint(U32, 1)),
        ("max_output_bytes", uint(limits.MAX_RESULT_SIZE)),
        ("max_job_bytes", uint(MAX_TRANSFER, 1)),
        ("max_disk_bytes", uint(U64, 1)),
        ("kinds", capacity.check_kinds),
    )

    @classmethod
    def declaring(cls, cap: JobCapacity) -> Ready:
        """READY (seq 0, epoch 0: the stream numbers it) carrying ``cap``."""
        return cls(
            max_memory_bytes=cap.memory_bytes,
            max_cpu_seconds=cap.cpu_seconds,
            max_wall_seconds=cap.wall_seconds,
            max_output_bytes=cap.output_bytes,
            max_job_bytes=cap.job_bytes,
            max_disk_bytes=cap.disk_bytes,
            kinds=cap.kinds,
        )

    @property
    def capacity(self) -> JobCapacity:
        return JobCapacity(
            memory_bytes=self.max_memory_bytes,
            cpu_seconds=self.max_cpu_seconds,
            wall_seconds=self.max_wall_seconds,
            output_bytes=self.max_output_bytes,
            job_bytes=self.max_job_bytes,
            disk_bytes=self.max_disk_bytes,
            kinds=self.kinds,
        )


_RESUME_FIELDS: Final = ("resume_attempt", "resume_size", "resume_sha256")


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(Body):
    """Server -> agent: a job follows; sizes, digests and resource limits."""

    ptype: ClassVar[PacketType] = PacketType.START
    seq: int = 0
    epoch: int = 0
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
    checkpoint_bytes: int | None = None
    resume_attempt: int | None = None
    resume_size: int | None = None
    resume_sha256: bytes | None = None

    _schema = (
        *SEQ_EPOCH,
        *JOB_ATTEMPT,
        ("kind", choice(JOB_KINDS)),
        ("code_size", uint(limits.MAX_CODE_SIZE, 1)),
        ("code_sha256", digest),
        ("input_size", uint(limits.MAX_INPUT_SIZE)),
        ("input_sha256", digest),
        ("cpu_seconds", uint(U32, 1)),
        ("memory_bytes", uint(U64, 1)),
        ("wall_seconds", uint(U32, 1)),
        ("output_bytes", uint(limits.MAX_RESULT_SIZE)),
        ("disk_bytes", uint(U64, 1)),
        ("checkpoint_bytes", optional(uint(limits.MAX_CHECKPOINT_SIZE, 1))),
        ("resume_attempt", optional(u32)),
        ("resume_size", optional(uint(limits.MAX_CHECKPOINT_SIZE))),
        ("resume_sha256", optional(digest)),
    )
    _omit_if_none = frozenset((*_RESUME_FIELDS, "checkpoint_bytes"))

    def __post_init__(self) -> None:
        validate(self)
        resume = (self.resume_attempt, self.resume_size, self.resume_sha256)
        if None in resume and resume != (None,) * 3:
            raise DecodeError("Start: resume_attempt, resume_size and resume_sha256 go together")
        if self.resume_attempt is not None and self.resume_attempt >= self.attempt:
            raise DecodeError("Start: resume_attempt must be an earlier attempt")
        if self.transfer_size > MAX_TRANSFER:
            raise DecodeError(f"Start: code, input and resume state exceed {MAX_TRANSFER} bytes")

    @property
    def transfer_size(self) -> int:
        """Bytes the CODE stream carries: code, input, then any resume state."""
        return self.code_size + self.input_size + (self.resume_size or 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class End(Body):
    """Server -> agent: the job stream is complete; ``total`` bytes were sent."""

    ptype: ClassVar[PacketType] = PacketType.END
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    total: int

    _schema = (*SEQ_EPOCH, *JOB_ATTEMPT, ("total", uint(MAX_TRANSFER)))


_FIN_FIELDS: Final = ("sha256", "status", "detail", "cpu_ms", "wall_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result(Body):
    """Agent -> server: one chunk of the result, or (``fin``) the closing summary.

    Data chunks have ``fin`` false and no summary keys. The last RESULT of a job
    has ``fin`` true, empty ``data``, ``offset == total`` and all five summary fields.
    """

    ptype: ClassVar[PacketType] = PacketType.RESULT
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    offset: int
    total: int
    data: bytes
    fin: bool
    sha256: bytes | None = None
    status: str | None = None
    detail: str | None = None
    cpu_ms: int | None = None
    wall_ms: int | None = None

    _schema = (
        *SEQ_EPOCH,
        *JOB_ATTEMPT,
        ("offset", u64),
        ("total", uint(limits.MAX_RESULT_SIZE)),
        ("data", binary(0, limits.MAX_CHUNK)),
        ("fin", boolean),
        ("sha256", optional(digest)),
        ("status", optional(text(limits.MAX_STATUS))),
        ("detail", optional(text(limits.MAX_TEXT))),
        ("cpu_ms", optional(u32)),
        ("wall_ms", optional(u32)),
    )
    _omit_if_none = frozenset(_FIN_FIELDS)

    def __post_init__(self) -> None:
        validate(self)
        summary = (self.sha256, self.status, self.detail, self.cpu_ms, self.wall_ms)
        if self.fin:
            # The summary rides alone, so a fin RESULT always fits in a datagram.
            if self.data or self.offset != self.total:
                raise DecodeError("Result: the fin chunk carries no data and offset == total")
            if None in summary:
                raise DecodeError("Result: fin requires sha256, status, detail, cpu_ms, wall_ms")
        else:
            if not self.data or self.offset + len(self.data) > self.total:
                raise DecodeError("Result: a data chunk is non-empty and ends within total")
            if summary != (None,) * 5:
                raise DecodeError("Result: summary fields are only allowed with fin")


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint(Body):
    """Agent -> server: one chunk of a running job's latest checkpoint, or (``fin``)
    its SHA-256. Sent only when START offered ``checkpoint_bytes``, whole and in order,
    one checkpoint at a time; the fin chunk carries no data and ``offset == total``.
    """

    ptype: ClassVar[PacketType] = PacketType.CHECKPOINT
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    offset: int
    total: int
    data: bytes
    fin: bool
    sha256: bytes | None = None

    _schema = (
        *SEQ_EPOCH,
        *JOB_ATTEMPT,
        ("offset", u64),
        ("total", uint(limits.MAX_CHECKPOINT_SIZE)),
        ("data", binary(0, limits.MAX_CHUNK)),
        ("fin", boolean),
        ("sha256", optional(digest)),
    )
    _omit_if_none = frozenset({"sha256"})

    def __post_init__(self) -> None:
        validate(self)
        if self.fin:
            if self.data or self.offset != self.total or self.sha256 is None:
                raise DecodeError("Checkpoint: the fin chunk is sha256 alone, at offset == total")
        elif not self.data or self.offset + len(self.data) > self.total or self.sha256:
            raise DecodeError("Checkpoint: a data chunk is non-empty, ends within total, no sha256")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset(Body):
    """Server -> agent: abandon the current job and streams, and start ``epoch``."""

    ptype: ClassVar[PacketType] = PacketType.RESET
    epoch: int
    reason: str

    _schema = (("epoch", u32), ("reason", text(limits.MAX_TEXT)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Body):
    ptype: ClassVar[PacketType] = PacketType.PING
    token: int

    _schema = (("token", u64),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Body):
    ptype: ClassVar[PacketType] = PacketType.PONG
    token: int

    _schema = (("token", u64),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Body):
    """Either side: a failure with an ErrorCode, optionally about one job attempt.

    ``seq``/``epoch`` are present exactly when the ERROR travels encrypted (then it
    is part of the reliable stream); a plaintext ERROR leaves both keys out.
    ``job``/``attempt`` are always sent, as nil when the error concerns no job.
    """

    ptype: ClassVar[PacketType] = PacketType.ERROR
    seq: int | None = None
    epoch: int | None = None
    code: int
    message: str
    job: int | None = None
    attempt: int | None = None

    _schema = (
        ("seq", optional(u64)),
        ("epoch", optional(u32)),
        ("code", u16),
        ("message", text(limits.MAX_TEXT)),
        ("job", optional(u64)),
        ("attempt", optional(u32)),
    )
    _omit_if_none = frozenset({"seq", "epoch"})

    def __post_init__(self) -> None:
        validate(self)
        if (self.seq is None) != (self.epoch is None):
            raise DecodeError("Error: seq and epoch must both be present or both absent")
        if (self.job is None) != (self.attempt is None):
            raise DecodeError("Error: job and attempt must both be set or both be nil")
