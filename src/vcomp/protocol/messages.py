"""Packet bodies of vcomp/1: one frozen dataclass per packet type, and the codec.

A body is a msgpack map with str keys (PROTOCOL.md, "Bodies"). Dataclass field
order is the key order the encoder emits. Every message validates itself on
construction, so a decoded message is always within the schema and an encoded
one is always something the peer accepts.

:func:`decode_body` turns any byte string into a valid message or raises
:class:`~vcomp.errors.DecodeError` (or its subclass
:class:`~vcomp.errors.LimitExceeded`), never anything else. Lengths are checked
before msgpack allocates: the body length first, then msgpack's own per-object
limits, then the exact schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from itertools import pairwise
from typing import Any, ClassVar, Final, TypeAlias, TypeVar, get_args

import msgpack

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.wire import Header, PacketType, pack_header, unpack_header

__all__ = [
    "Ack",
    "Attest",
    "Challenge",
    "Code",
    "End",
    "Error",
    "ErrorCode",
    "Hello",
    "Key",
    "Message",
    "Ping",
    "Pong",
    "Ready",
    "Reject",
    "Reset",
    "Result",
    "Retry",
    "Start",
    "decode_body",
    "decode_plaintext_packet",
    "encode_body",
    "encode_plaintext_packet",
    "pad_hello",
    "with_sequence",
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
    SESSION_EXPIRED = 30
    IDLE_TIMEOUT = 31
    SERVER_SHUTDOWN = 32
    AGENT_SHUTDOWN = 33
    TRANSFER_FAILED = 40
    BUSY = 41
    INTERNAL = 50


JOB_KINDS: Final = frozenset({"python", "exec"})
MAX_TRANSFER: Final = limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE
"""Largest ``code || input`` stream a START may announce."""

U8: Final = 0xFF
U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF
U64: Final = 0xFFFF_FFFF_FFFF_FFFF

# ---- field checks ---------------------------------------------------------------
# A check raises DecodeError (LimitExceeded for a size bound) or returns None.
# _validate adds the class and field name to the message.
Check: TypeAlias = Callable[[object], None]


def _uint(maximum: int, minimum: int = 0) -> Check:
    def check(value: object) -> None:
        # Int subclasses such as ErrorCode are fine; bool is not a number here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError(f"expected an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise DecodeError(f"{value} is outside {minimum}..{maximum}")

    return check


def _bin(minimum: int, maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not bytes:
            raise DecodeError(f"expected bin, got {type(value).__name__}")
        if len(value) > maximum:
            raise LimitExceeded(f"{len(value)} bytes, at most {maximum} allowed")
        if len(value) < minimum:
            raise DecodeError(f"{len(value)} bytes, at least {minimum} required")

    return check


def _text(maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not str:
            raise DecodeError(f"expected str, got {type(value).__name__}")
        if len(value) > maximum:  # cheap pre-check; UTF-8 is never shorter
            raise LimitExceeded(f"text longer than {maximum} bytes")
        if not value.isascii():
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise DecodeError("text is not valid Unicode") from None
            if size > maximum:
                raise LimitExceeded(f"text of {size} UTF-8 bytes, at most {maximum}")

    return check


def _choice(options: frozenset[str]) -> Check:
    def check(value: object) -> None:
        if type(value) is not str or value not in options:
            raise DecodeError(f"expected one of {sorted(options)}")

    return check


def _boolean(value: object) -> None:
    if type(value) is not bool:
        raise DecodeError(f"expected bool, got {type(value).__name__}")


def _optional(inner: Check) -> Check:
    def check(value: object) -> None:
        if value is not None:
            inner(value)

    return check


def _array(item: Check, minimum: int, maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not tuple:
            raise DecodeError(f"expected array, got {type(value).__name__}")
        if len(value) > maximum:
            raise LimitExceeded(f"{len(value)} items, at most {maximum} allowed")
        if len(value) < minimum:
            raise DecodeError(f"{len(value)} items, at least {minimum} required")
        for element in value:
            item(element)

    return check


def _pair(first: Check, second: Check) -> Check:
    def check(value: object) -> None:
        if type(value) is not tuple or len(value) != 2:
            raise DecodeError("expected an array of 2 items")
        first(value[0])
        second(value[1])

    return check


_u8 = _uint(U8)
_u16 = _uint(U16)
_u32 = _uint(U32)
_u64 = _uint(U64)
_digest = _bin(limits.DIGEST_LEN, limits.DIGEST_LEN)


def _validate(message: _Body) -> None:
    for name, check in message._schema:
        _validate_field(type(message), name, check, getattr(message, name))


def _validate_field(cls: type, name: str, check: Check, value: object) -> None:
    try:
        check(value)
    except DecodeError as exc:
        raise type(exc)(f"{cls.__name__}.{name}: {exc}") from None


class _Body:
    """Behaviour shared by every body class (not itself a message)."""

    __slots__ = ()
    ptype: ClassVar[PacketType]
    _schema: ClassVar[tuple[tuple[str, Check], ...]]
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()
    """Optional keys that are left out of the map (rather than sent as nil) when None."""
    _max_body: ClassVar[int] = limits.MAX_PLAINTEXT_BODY
    _min_body: ClassVar[int] = 1

    def __post_init__(self) -> None:
        _validate(self)

    def _to_map(self) -> dict[str, object]:
        """The msgpack map: every field, minus optional keys that are None."""
        omit = self._omit_if_none
        values: dict[str, object] = {}
        for name, _ in self._schema:
            value = getattr(self, name)
            if value is None and name in omit:
                continue
            values[name] = value
        return values


_HANDSHAKE_MAX = limits.MAX_BODY

# ---- handshake (plaintext) -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(_Body):
    """Agent -> server: asks for a session. Sent twice: without, then with a cookie."""

    ptype: ClassVar[PacketType] = PacketType.HELLO
    versions: tuple[int, ...]
    agent: bytes
    nonce: bytes
    cookie: bytes = b""
    pad: bytes = b""

    _schema = (
        ("versions", _array(_u8, 1, limits.MAX_VERSIONS)),
        ("agent", _digest),
        ("nonce", _bin(limits.NONCE_LEN, limits.NONCE_LEN)),
        ("cookie", _bin(0, limits.MAX_COOKIE)),
        ("pad", _bin(0, limits.MAX_BODY)),
    )
    _max_body = _HANDSHAKE_MAX
    _min_body = limits.MIN_HELLO_BODY


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry(_Body):
    """Server -> agent: the stateless address-validation cookie."""

    ptype: ClassVar[PacketType] = PacketType.RETRY
    cookie: bytes

    _schema = (("cookie", _bin(1, limits.MAX_COOKIE)),)
    _max_body = _HANDSHAKE_MAX


_pcr_indices = _array(_uint(limits.PCR_COUNT - 1), 1, limits.MAX_PCRS)


def _check_pcr_selection(value: object) -> None:
    _pcr_indices(value)
    assert isinstance(value, tuple)
    for lower, higher in pairwise(value):
        if not lower < higher:
            raise DecodeError("PCR indices must be strictly ascending")


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge(_Body):
    """Server -> agent: attestation nonce and the PCRs the quote must cover."""

    ptype: ClassVar[PacketType] = PacketType.CHALLENGE
    nonce: bytes
    pcrs: tuple[int, ...]

    _schema = (
        ("nonce", _bin(limits.NONCE_LEN, limits.NONCE_LEN)),
        ("pcrs", _check_pcr_selection),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Attest(_Body):
    """Agent -> server: ephemeral RSA key, the quote binding it, and PCR values."""

    ptype: ClassVar[PacketType] = PacketType.ATTEST
    ephemeral: bytes
    quote: bytes
    signature: bytes
    pcr_values: tuple[bytes, ...]

    _schema = (
        ("ephemeral", _bin(1, limits.MAX_EPHEMERAL_SPKI)),
        ("quote", _bin(1, limits.MAX_QUOTE)),
        ("signature", _bin(1, limits.MAX_SIGNATURE)),
        ("pcr_values", _array(_digest, 1, limits.MAX_PCRS)),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Key(_Body):
    """Server -> agent: wrapped session key, signed transcript, session parameters."""

    ptype: ClassVar[PacketType] = PacketType.KEY
    wrapped: bytes
    server_key: bytes
    signature: bytes
    window: int
    idle_timeout_ms: int

    _schema = (
        ("wrapped", _bin(1, limits.MAX_WRAPPED_KEY)),
        ("server_key", _bin(limits.SERVER_KEY_LEN, limits.SERVER_KEY_LEN)),
        ("signature", _bin(limits.SERVER_SIGNATURE_LEN, limits.SERVER_SIGNATURE_LEN)),
        ("window", _uint(limits.MAX_WINDOW, limits.MIN_WINDOW)),
        ("idle_timeout_ms", _u32),
    )
    _max_body = _HANDSHAKE_MAX


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(_Body):
    """Server -> agent: the handshake failed; ``code`` is an ErrorCode value."""

    ptype: ClassVar[PacketType] = PacketType.REJECT
    code: int
    reason: str

    _schema = (("code", _u16), ("reason", _text(limits.MAX_TEXT)))
    _max_body = _HANDSHAKE_MAX


# ---- session (encrypted) --------------------------------------------------------
# seq and epoch default to 0 so a message can be built first and numbered by the
# reliable stream later with dataclasses.replace().

_SEQ_EPOCH: Final = (("seq", _u64), ("epoch", _u32))
_JOB_ATTEMPT: Final = (("job", _u64), ("attempt", _u32))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(_Body):
    """Agent -> server: idle and able to take ``slots`` jobs (first encrypted packet)."""

    ptype: ClassVar[PacketType] = PacketType.READY
    seq: int = 0
    epoch: int = 0
    slots: int = 1

    _schema = (*_SEQ_EPOCH, ("slots", _uint(U8, 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(_Body):
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

    _schema = (
        *_SEQ_EPOCH,
        *_JOB_ATTEMPT,
        ("kind", _choice(JOB_KINDS)),
        ("code_size", _uint(limits.MAX_CODE_SIZE, 1)),
        ("code_sha256", _digest),
        ("input_size", _uint(limits.MAX_INPUT_SIZE)),
        ("input_sha256", _digest),
        ("cpu_seconds", _uint(U32, 1)),
        ("memory_bytes", _uint(U64, 1)),
        ("wall_seconds", _uint(U32, 1)),
        ("output_bytes", _uint(limits.MAX_RESULT_SIZE)),
    )


def _code_ok(
    seq: object, epoch: object, job: object, attempt: object, offset: object, data: object
) -> bool:
    """All of CODE's rules in one expression (the per-packet fast path)."""
    return (
        type(seq) is int
        and type(epoch) is int
        and type(job) is int
        and type(attempt) is int
        and type(offset) is int
        and type(data) is bytes
        and 0 <= seq <= U64
        and 0 <= epoch <= U32
        and 0 <= job <= U64
        and 0 <= attempt <= U32
        and offset >= 0
        and 1 <= len(data) <= limits.MAX_CHUNK
        and offset + len(data) <= MAX_TRANSFER
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Code(_Body):
    """Server -> agent: ``data`` at ``offset`` of the stream ``code || input``."""

    ptype: ClassVar[PacketType] = PacketType.CODE
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    offset: int
    data: bytes

    _schema = (
        *_SEQ_EPOCH,
        *_JOB_ATTEMPT,
        ("offset", _u64),
        ("data", _bin(1, limits.MAX_CHUNK)),
    )

    def __init__(
        self, *, seq: int = 0, epoch: int = 0, job: int, attempt: int, offset: int, data: bytes
    ) -> None:
        # Written out (dataclass keeps it): the generated frozen __init__ goes through
        # object.__setattr__ per field and costs about twice as much, once per chunk.
        _set_code_seq(self, seq)
        _set_code_epoch(self, epoch)
        _set_code_job(self, job)
        _set_code_attempt(self, attempt)
        _set_code_offset(self, offset)
        _set_code_data(self, data)
        if not _code_ok(seq, epoch, job, attempt, offset, data):
            self.__post_init__()  # names the failure, or accepts int subclasses

    def __post_init__(self) -> None:
        # CODE is checked once per packet: one inline test on the fast path; the
        # generic checks run only to name the failure.
        offset, data = self.offset, self.data
        if _code_ok(self.seq, self.epoch, self.job, self.attempt, offset, data):
            return
        _validate(self)
        if offset + len(data) > MAX_TRANSFER:
            raise LimitExceeded("Code: chunk ends beyond the largest code + input")

    def _to_map(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "epoch": self.epoch,
            "job": self.job,
            "attempt": self.attempt,
            "offset": self.offset,
            "data": self.data,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class End(_Body):
    """Server -> agent: the job stream is complete; ``total`` bytes were sent."""

    ptype: ClassVar[PacketType] = PacketType.END
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    total: int

    _schema = (*_SEQ_EPOCH, *_JOB_ATTEMPT, ("total", _uint(MAX_TRANSFER)))


_FIN_FIELDS: Final = ("sha256", "status", "detail", "cpu_ms", "wall_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result(_Body):
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
        *_SEQ_EPOCH,
        *_JOB_ATTEMPT,
        ("offset", _u64),
        ("total", _uint(limits.MAX_RESULT_SIZE)),
        ("data", _bin(0, limits.MAX_CHUNK)),
        ("fin", _boolean),
        ("sha256", _optional(_digest)),
        ("status", _optional(_text(limits.MAX_STATUS))),
        ("detail", _optional(_text(limits.MAX_TEXT))),
        ("cpu_ms", _optional(_u32)),
        ("wall_ms", _optional(_u32)),
    )
    _omit_if_none = frozenset(_FIN_FIELDS)

    def __post_init__(self) -> None:
        _validate(self)
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


_range_list = _array(_pair(_u64, _u64), 1, limits.MAX_ACK_RANGES)


def _check_ack_ranges(value: object) -> None:
    _range_list(value)
    assert isinstance(value, tuple)
    floor = U64 + 1
    for lo, hi in value:
        if lo > hi:
            raise DecodeError(f"range [{lo}, {hi}] has lo > hi")
        if hi >= floor:
            raise DecodeError("ranges must be strictly descending and must not overlap")
        floor = lo


def _ack_ok(ranges: object, delay_us: object, committed: object) -> bool:
    """All of ACK's rules without the generic checks (which only name failures)."""
    if type(ranges) is not tuple or not 1 <= len(ranges) <= limits.MAX_ACK_RANGES:
        return False
    if type(delay_us) is not int or not 0 <= delay_us <= U32:
        return False
    if type(committed) is not tuple or len(committed) > limits.MAX_COMMITTED:
        return False
    floor = U64 + 1  # every hi must stay below the previous pair's lo
    for pair in ranges:
        if type(pair) is not tuple or len(pair) != 2:
            return False
        lo, hi = pair
        if type(lo) is not int or type(hi) is not int or not 0 <= lo <= hi < floor:
            return False
        floor = lo
    for pair in committed:
        if type(pair) is not tuple or len(pair) != 2:
            return False
        job, attempt = pair
        if type(job) is not int or type(attempt) is not int:
            return False
        if not (0 <= job <= U64 and 0 <= attempt <= U32):
            return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(_Body):
    """Either side: packet numbers received, and (server) results durably committed."""

    ptype: ClassVar[PacketType] = PacketType.ACK
    ranges: tuple[tuple[int, int], ...]
    delay_us: int
    committed: tuple[tuple[int, int], ...] = ()

    _schema = (
        ("ranges", _check_ack_ranges),
        ("delay_us", _u32),
        ("committed", _array(_pair(_u64, _u32), 0, limits.MAX_COMMITTED)),
    )

    def __init__(
        self,
        *,
        ranges: tuple[tuple[int, int], ...],
        delay_us: int,
        committed: tuple[tuple[int, int], ...] = (),
    ) -> None:
        # Written out for the same reason as Code.__init__ (one ACK per two packets).
        _set_ack_ranges(self, ranges)
        _set_ack_delay_us(self, delay_us)
        _set_ack_committed(self, committed)
        if not _ack_ok(ranges, delay_us, committed):
            _validate(self)

    def __post_init__(self) -> None:
        # One ACK per two data packets: plain loops first, named errors only on failure.
        if not _ack_ok(self.ranges, self.delay_us, self.committed):
            _validate(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reset(_Body):
    """Server -> agent: abandon the current job and streams, and start ``epoch``."""

    ptype: ClassVar[PacketType] = PacketType.RESET
    epoch: int
    reason: str

    _schema = (("epoch", _u32), ("reason", _text(limits.MAX_TEXT)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(_Body):
    ptype: ClassVar[PacketType] = PacketType.PING
    token: int

    _schema = (("token", _u64),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(_Body):
    ptype: ClassVar[PacketType] = PacketType.PONG
    token: int

    _schema = (("token", _u64),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Body):
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
        ("seq", _optional(_u64)),
        ("epoch", _optional(_u32)),
        ("code", _u16),
        ("message", _text(limits.MAX_TEXT)),
        ("job", _optional(_u64)),
        ("attempt", _optional(_u32)),
    )
    _omit_if_none = frozenset({"seq", "epoch"})

    def __post_init__(self) -> None:
        _validate(self)
        if (self.seq is None) != (self.epoch is None):
            raise DecodeError("Error: seq and epoch must both be present or both absent")
        if (self.job is None) != (self.attempt is None):
            raise DecodeError("Error: job and attempt must both be set or both be nil")


Message: TypeAlias = (
    Hello | Retry | Challenge | Attest | Key | Reject | Ready | Start | Code | End | Result
    | Ack | Reset | Ping | Pong | Error
)  # fmt: skip

_CLASSES: Final[tuple[type[Message], ...]] = get_args(Message)

Setter: TypeAlias = Callable[[object, object], None]


@dataclass(frozen=True, slots=True)
class _Layout:
    """Per-class codec tables, computed once at import."""

    cls: type[Message]
    names: tuple[str, ...]
    setters: tuple[tuple[str, Setter], ...]
    all_keys: frozenset[str]
    required: frozenset[str]
    omit_if_none: frozenset[str]
    min_body: int
    max_body: int


def _layout(cls: type[Message]) -> _Layout:
    names = tuple(f.name for f in fields(cls))
    assert names == tuple(name for name, _ in cls._schema), cls
    # Slot descriptors let the decoder fill a frozen instance without the
    # keyword-argument __init__, which costs more than the whole msgpack parse.
    setters = tuple((name, cls.__dict__[name].__set__) for name in names)
    return _Layout(
        cls=cls,
        names=names,
        setters=setters,
        all_keys=frozenset(names),
        required=frozenset(names) - cls._omit_if_none,
        omit_if_none=cls._omit_if_none,
        min_body=cls._min_body,
        max_body=cls._max_body,
    )


_BY_CLASS: Final = {cls: _layout(cls) for cls in _CLASSES}
_BY_TYPE: Final[dict[int, _Layout]] = {cls.ptype: _BY_CLASS[cls] for cls in _CLASSES}
assert set(_BY_TYPE) == {int(t) for t in PacketType}

# One packer for the module: Packer.pack runs entirely under the GIL for the
# plain types a validated message holds, and reusing it saves its set-up cost.
_PACKER: Final = msgpack.Packer(use_bin_type=True, autoreset=True)
_pack = _PACKER.pack
_unpackb: Final = msgpack.unpackb
# msgpack refuses any object longer than these before allocating it. (They are
# passed as literal keywords below: a **dict or functools.partial call costs
# more than the parse of a CODE body.)
_MAX_BIN: Final = limits.MAX_BODY
_MAX_STR: Final = limits.MAX_TEXT
_MAX_ARRAY: Final = max(
    limits.MAX_VERSIONS, limits.MAX_PCRS, limits.MAX_ACK_RANGES, limits.MAX_COMMITTED
)
_MAX_MAP: Final = limits.MAX_BODY_KEYS
# Slot setters fill a frozen instance without the keyword __init__ (see _layout).
_set_code_seq = Code.__dict__["seq"].__set__
_set_code_epoch = Code.__dict__["epoch"].__set__
_set_code_job = Code.__dict__["job"].__set__
_set_code_attempt = Code.__dict__["attempt"].__set__
_set_code_offset = Code.__dict__["offset"].__set__
_set_code_data = Code.__dict__["data"].__set__
_new: Final = object.__new__

_CODE: Final = PacketType.CODE  # enum attribute look-ups are slow on the hot path
_MAX_CHUNK: Final = limits.MAX_CHUNK
_MAX_PLAINTEXT_BODY: Final = limits.MAX_PLAINTEXT_BODY
_ACK: Final = PacketType.ACK
_FIXMAP_OF_3: Final = 0x83
_FIXMAP_OF_6: Final = 0x86
# The per-datagram fast paths below rely on these bounds being the generic ones.
assert Code._max_body == Ack._max_body == _MAX_PLAINTEXT_BODY
assert Code._min_body == Ack._min_body == 1
assert not Code._omit_if_none and not Ack._omit_if_none
_FIXMAP_FIRST: Final = 0x80
_FIXMAP_LAST: Final = 0x8F
_MAP16: Final = 0xDE


def encode_body(message: Message) -> bytes:
    """The msgpack body of ``message`` (already validated when it was built).

    A HELLO too short for the anti-amplification minimum is sent as
    :func:`pad_hello` of itself, so an unpadded HELLO can never leave.
    """
    # One CODE or ACK per datagram: their maps inline, no layout look-up (same bytes
    # as _to_map; both types have only the maximum size).
    body: bytes
    if type(message) is Code:
        body = _pack(
            {
                "seq": message.seq,
                "epoch": message.epoch,
                "job": message.job,
                "attempt": message.attempt,
                "offset": message.offset,
                "data": message.data,
            }
        )
    elif type(message) is Ack:
        body = _pack(
            {"ranges": message.ranges, "delay_us": message.delay_us, "committed": message.committed}
        )
    else:
        return _encode_other(message)
    if len(body) > _MAX_PLAINTEXT_BODY:
        raise LimitExceeded(f"{type(message).__name__} body of {len(body)} bytes is too large")
    return body


def _encode_other(message: Message) -> bytes:
    layout = _BY_CLASS[type(message)]
    body: bytes = _pack(message._to_map())
    if len(body) > layout.max_body:
        raise LimitExceeded(f"{type(message).__name__} body of {len(body)} bytes is too large")
    if len(body) < layout.min_body:  # only HELLO has a minimum
        assert isinstance(message, Hello)
        body = _pack(pad_hello(message)._to_map())
    return body


def _map_size(body: bytes) -> int:
    """Entry count from the top-level map header (to detect duplicate keys)."""
    first = body[0]
    if _FIXMAP_FIRST <= first <= _FIXMAP_LAST:
        return first - _FIXMAP_FIRST
    if first == _MAP16 and len(body) >= 3:
        return (body[1] << 8) | body[2]
    raise DecodeError("body is not a msgpack map with at most 65535 entries")


def _decode_code(body: bytes) -> Code | None:
    """The per-packet path: a well-formed CODE body, or None to take the generic path.

    CODE arrives once per 1200 bytes of job, so this skips the generic loop. Key
    order does not matter; any other irregularity falls back to the generic path,
    which then names the error.
    """
    if not body or body[0] != _FIXMAP_OF_6 or len(body) > _MAX_PLAINTEXT_BODY:
        return None
    try:
        obj = _unpackb(
            body,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=_MAX_BIN,
            max_str_len=_MAX_STR,
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except Exception:  # the generic path reports it
        return None
    if type(obj) is not dict or len(obj) != 6:
        return None
    try:
        seq, epoch, job, attempt = obj["seq"], obj["epoch"], obj["job"], obj["attempt"]
        offset, data = obj["offset"], obj["data"]
    except KeyError:
        return None
    # The rules of _code_ok, inlined: a call here costs a sixth of the whole decode.
    if not (
        type(seq) is int
        and type(epoch) is int
        and type(job) is int
        and type(attempt) is int
        and type(offset) is int
        and type(data) is bytes
        and 0 <= seq <= U64
        and 0 <= epoch <= U32
        and 0 <= job <= U64
        and 0 <= attempt <= U32
        and offset >= 0
        and 1 <= len(data) <= _MAX_CHUNK
        and offset + len(data) <= MAX_TRANSFER
    ):
        return None
    message: Code = _new(Code)
    _set_code_seq(message, seq)
    _set_code_epoch(message, epoch)
    _set_code_job(message, job)
    _set_code_attempt(message, attempt)
    _set_code_offset(message, offset)
    _set_code_data(message, data)
    return message


_set_ack_ranges = Ack.__dict__["ranges"].__set__
_set_ack_delay_us = Ack.__dict__["delay_us"].__set__
_set_ack_committed = Ack.__dict__["committed"].__set__


def _decode_ack(body: bytes) -> Ack | None:
    """The per-ACK path: a well-formed ACK body, or None to take the generic path.

    Same contract as :func:`_decode_code`: it accepts exactly what the generic
    path accepts for a three-key map, and leaves every error to that path.
    """
    if not body or body[0] != _FIXMAP_OF_3 or len(body) > _MAX_PLAINTEXT_BODY:
        return None
    try:
        obj = _unpackb(
            body,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=_MAX_BIN,
            max_str_len=_MAX_STR,
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except Exception:  # the generic path reports it
        return None
    if type(obj) is not dict or len(obj) != 3:
        return None
    try:
        ranges, delay_us, committed = obj["ranges"], obj["delay_us"], obj["committed"]
    except KeyError:
        return None
    if not _ack_ok(ranges, delay_us, committed):
        return None
    message: Ack = _new(Ack)
    _set_ack_ranges(message, ranges)
    _set_ack_delay_us(message, delay_us)
    _set_ack_committed(message, committed)
    return message


def decode_body(ptype: PacketType | int, body: bytes) -> Message:
    """Decode and validate the body of a packet of type ``ptype``.

    Raises only :class:`DecodeError` (and its subclass :class:`LimitExceeded`).
    """
    if ptype is _CODE:
        code = _decode_code(body)
        if code is not None:
            return code
    elif ptype is _ACK:
        ack = _decode_ack(body)
        if ack is not None:
            return ack
    layout = _BY_TYPE.get(ptype)
    if layout is None:
        raise DecodeError(f"unknown packet type {ptype!r}")
    size = len(body)
    if size > layout.max_body:
        raise LimitExceeded(f"{layout.cls.__name__} body of {size} bytes is too large")
    if size < layout.min_body:
        raise DecodeError(f"{layout.cls.__name__} body of {size} bytes is too short")
    entries = _map_size(body)
    try:
        obj = _unpackb(
            body,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=_MAX_BIN,
            max_str_len=_MAX_STR,
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; all mean "not a body"
        raise DecodeError(f"invalid msgpack: {type(exc).__name__}") from None
    if type(obj) is not dict or len(obj) != entries:
        raise DecodeError("body must be a msgpack map without duplicate keys")
    message: Message = _new(layout.cls)
    if entries == len(layout.setters):
        # As many keys as fields: if every field is found, there is no stranger.
        try:
            for name, setter in layout.setters:
                setter(message, obj[name])
        except KeyError:
            raise _key_mismatch(layout, obj) from None
    elif layout.required <= obj.keys() <= layout.all_keys:
        get = obj.get
        for name, setter in layout.setters:
            setter(message, get(name))  # absent optional keys become None
    else:
        raise _key_mismatch(layout, obj)
    for name in layout.omit_if_none:
        if obj.get(name, 0) is None:
            raise DecodeError(f"{layout.cls.__name__}.{name}: leave the key out instead of nil")
    message.__post_init__()
    return message


def _key_mismatch(layout: _Layout, obj: dict[object, object]) -> DecodeError:
    unknown = sorted(map(repr, obj.keys() - layout.all_keys))
    missing = sorted(layout.required - obj.keys())
    return DecodeError(f"{layout.cls.__name__}: unknown keys {unknown}, missing keys {missing}")


Sequenced = TypeVar("Sequenced", Ready, Start, Code, End, Result, Error)


def with_sequence(message: Sequenced, seq: int, epoch: int) -> Sequenced:
    """A copy of a reliable message numbered ``seq`` in ``epoch``.

    Same result as ``dataclasses.replace(message, seq=seq, epoch=epoch)`` at a
    fraction of the cost; the other fields were validated when ``message`` was built.
    """
    cls = type(message)
    if not (type(seq) is int and type(epoch) is int and 0 <= seq <= U64 and 0 <= epoch <= U32):
        # Off the fast path: int subclasses pass here, anything else is named.
        _validate_field(cls, "seq", _u64, seq)
        _validate_field(cls, "epoch", _u32, epoch)
    copy: Sequenced = _new(cls)
    if cls is Code:
        # Once per CODE packet sent: the six slots directly (Any: no isinstance cost).
        code: Any = message
        _set_code_seq(copy, seq)
        _set_code_epoch(copy, epoch)
        _set_code_job(copy, code.job)
        _set_code_attempt(copy, code.attempt)
        _set_code_offset(copy, code.offset)
        _set_code_data(copy, code.data)
        return copy
    for name, setter in _BY_CLASS[cls].setters:
        if name == "seq":
            setter(copy, seq)
        elif name == "epoch":
            setter(copy, epoch)
        else:
            setter(copy, getattr(message, name))
    return copy


def pad_hello(hello: Hello, datagram_size: int = limits.MIN_HELLO_DATAGRAM) -> Hello:
    """``hello`` with zero padding so that its datagram is exactly ``datagram_size``."""
    if not limits.MIN_HELLO_DATAGRAM <= datagram_size <= limits.MAX_DATAGRAM:
        raise LimitExceeded(f"HELLO datagram size {datagram_size} is out of bounds")
    unpadded = len(_pack(replace(hello, pad=b"")._to_map()))  # counts b"\xc4\x00"
    # Every HELLO field together stays under 200 bytes, so the pad is always a
    # bin16 (3-byte header, one more than the empty pad's bin8).
    length = datagram_size - limits.HEADER_LEN - unpadded - 1
    assert 256 <= length <= 0xFFFF, length
    return replace(hello, pad=bytes(length))


def encode_plaintext_packet(message: Message, session_id: int, packet_number: int) -> bytes:
    """Header + body of a packet that travels in the clear (handshake, early ERROR)."""
    body = encode_body(message)
    return pack_header(message.ptype, 0, session_id, packet_number, len(body)) + body


def decode_plaintext_packet(datagram: bytes) -> tuple[Header, Message]:
    """Header and message of a datagram that travels in the clear."""
    header = unpack_header(datagram)
    if header.flags:
        raise DecodeError("packet is encrypted; open it with the record layer")
    return header, decode_body(header.ptype, datagram[limits.HEADER_LEN :])
