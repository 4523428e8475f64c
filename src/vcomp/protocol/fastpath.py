"""CODE and ACK, the per-datagram messages: the one codec of each, hot paths included.

A job travels as one CODE per 1200 bytes, answered by one ACK per one or two
packets, so these two classes skip the generic machinery of the other bodies.
Everything about each lives here, once:

* its rules: ``_schema`` (which names a failure) and one predicate, :func:`_code_ok`
  / :func:`_ack_ok`, that construction and decoding both use (tests check that the
  predicate accepts exactly what the schema accepts);
* its map: ``_to_map`` (encoding, :func:`vcomp.protocol.messages.encode_body`) and
  :func:`decode_code` / :func:`decode_ack` (the same keys, back into the slots);
  :func:`encode_code` packs CODE's map straight from the fields, so the sender's
  data path builds no ``Code`` per chunk;
* renumbering a CODE for the reliable stream: :func:`code_with_sequence`.

Each fast path accepts exactly what the generic path accepts and leaves naming
every error to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

import msgpack

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.schema import (
    JOB_ATTEMPT,
    MAX_ARRAY,
    MAX_BIN,
    MAX_MAP,
    MAX_STR,
    MAX_TRANSFER,
    SEQ_EPOCH,
    U32,
    U64,
    Body,
    array,
    binary,
    pair,
    u32,
    u64,
    validate,
)
from vcomp.protocol.wire import PacketType

__all__ = [
    "Ack",
    "Code",
    "code_with_sequence",
    "decode_ack",
    "decode_code",
    "encode_code",
]


def _code_ok(
    seq: object, epoch: object, job: object, attempt: object, offset: object, data: object
) -> bool:
    """All of CODE's rules in one expression: the one statement of them besides ``_schema``."""
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
class Code(Body):
    """Server -> agent: ``data`` at ``offset`` of the stream ``code || input``."""

    ptype: ClassVar[PacketType] = PacketType.CODE
    seq: int = 0
    epoch: int = 0
    job: int
    attempt: int
    offset: int
    data: bytes

    _schema = (
        *SEQ_EPOCH,
        *JOB_ATTEMPT,
        ("offset", u64),
        ("data", binary(1, limits.MAX_CHUNK)),
    )

    def __init__(
        self, *, seq: int = 0, epoch: int = 0, job: int, attempt: int, offset: int, data: bytes
    ) -> None:
        # Written out (dataclass keeps it): the generated frozen __init__ goes through
        # object.__setattr__ per field and costs about twice as much, once per chunk.
        set_code_seq(self, seq)
        set_code_epoch(self, epoch)
        set_code_job(self, job)
        set_code_attempt(self, attempt)
        set_code_offset(self, offset)
        set_code_data(self, data)
        if not _code_ok(seq, epoch, job, attempt, offset, data):
            self.__post_init__()  # names the failure, or accepts int subclasses

    def __post_init__(self) -> None:
        # CODE is checked once per packet: one inline test on the fast path; the
        # generic checks run only to name the failure.
        offset, data = self.offset, self.data
        if _code_ok(self.seq, self.epoch, self.job, self.attempt, offset, data):
            return
        validate(self)
        if offset + len(data) > MAX_TRANSFER:
            raise LimitExceeded("Code: chunk ends beyond the largest code + input")

    def _to_map(self) -> dict[str, object]:
        return _code_map(self.seq, self.epoch, self.job, self.attempt, self.offset, self.data)


def _code_map(
    seq: int, epoch: int, job: int, attempt: int, offset: int, data: bytes
) -> dict[str, object]:
    """CODE's map, the one place its keys are written: decode_code reads them back."""
    return {
        "seq": seq,
        "epoch": epoch,
        "job": job,
        "attempt": attempt,
        "offset": offset,
        "data": data,
    }


_range_list = array(pair(u64, u64), 1, limits.MAX_ACK_RANGES)


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
    for entry in ranges:
        if type(entry) is not tuple or len(entry) != 2:
            return False
        lo, hi = entry
        if type(lo) is not int or type(hi) is not int or not 0 <= lo <= hi < floor:
            return False
        floor = lo
    for entry in committed:
        if type(entry) is not tuple or len(entry) != 2:
            return False
        job, attempt = entry
        if type(job) is not int or type(attempt) is not int:
            return False
        if not (0 <= job <= U64 and 0 <= attempt <= U32):
            return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Body):
    """Either side: packet numbers received, and (server) results durably committed."""

    ptype: ClassVar[PacketType] = PacketType.ACK
    ranges: tuple[tuple[int, int], ...]
    delay_us: int
    committed: tuple[tuple[int, int], ...] = ()

    _schema = (
        ("ranges", _check_ack_ranges),
        ("delay_us", u32),
        ("committed", array(pair(u64, u32), 0, limits.MAX_COMMITTED)),
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
            validate(self)

    def __post_init__(self) -> None:
        # One ACK per two data packets: plain loops first, named errors only on failure.
        if not _ack_ok(self.ranges, self.delay_us, self.committed):
            validate(self)

    def _to_map(self) -> dict[str, object]:
        # ACK's map: decode_ack reads the same keys back.
        return {"ranges": self.ranges, "delay_us": self.delay_us, "committed": self.committed}


# Slot setters fill a frozen instance without the keyword __init__.
set_code_seq = Code.__dict__["seq"].__set__
set_code_epoch = Code.__dict__["epoch"].__set__
set_code_job = Code.__dict__["job"].__set__
set_code_attempt = Code.__dict__["attempt"].__set__
set_code_offset = Code.__dict__["offset"].__set__
set_code_data = Code.__dict__["data"].__set__
_set_ack_ranges = Ack.__dict__["ranges"].__set__
_set_ack_delay_us = Ack.__dict__["delay_us"].__set__
_set_ack_committed = Ack.__dict__["committed"].__set__
_new: Final = object.__new__
_unpackb: Final = msgpack.unpackb
# The codec's packer (messages.encode_body uses it too): reusing one saves its set-up.
PACKER: Final = msgpack.Packer(use_bin_type=True, autoreset=True)
_pack: Final = PACKER.pack

_MAX_PLAINTEXT_BODY: Final = limits.MAX_PLAINTEXT_BODY
_FIXMAP_OF_3: Final = 0x83
_FIXMAP_OF_6: Final = 0x86
# The per-datagram fast paths (here and in messages.encode_body) rely on these
# bounds being the generic ones.
assert Code._max_body == Ack._max_body == _MAX_PLAINTEXT_BODY
assert Code._min_body == Ack._min_body == 1
assert not Code._omit_if_none and not Ack._omit_if_none
# The largest CODE body: a fixmap, six short keys, six u64 values, a bin16 of MAX_CHUNK.
assert 1 + 6 * (1 + 7) + 6 * 9 + 3 + limits.MAX_CHUNK <= _MAX_PLAINTEXT_BODY


def decode_code(body: bytes) -> Code | None:
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
            max_bin_len=MAX_BIN,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
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
    if not _code_ok(seq, epoch, job, attempt, offset, data):
        return None
    message: Code = _new(Code)
    set_code_seq(message, seq)
    set_code_epoch(message, epoch)
    set_code_job(message, job)
    set_code_attempt(message, attempt)
    set_code_offset(message, offset)
    set_code_data(message, data)
    return message


def encode_code(seq: int, epoch: int, job: int, attempt: int, offset: int, data: bytes) -> bytes:
    """The body of ``Code(seq=seq, ..., data=data)``, byte for byte, without building it.

    The sender's per-chunk path. Fields that break CODE's rules raise what
    ``Code(...)`` raises (it names the failure).
    """
    if not _code_ok(seq, epoch, job, attempt, offset, data):
        code = Code(seq=seq, epoch=epoch, job=job, attempt=attempt, offset=offset, data=data)
        seq, epoch, job, attempt, offset = code.seq, code.epoch, code.job, code.attempt, code.offset
    # MAX_CHUNK bytes and six u64 fields always fit (asserted below): no size check.
    body: bytes = _pack(_code_map(seq, epoch, job, attempt, offset, data))
    return body


def code_with_sequence(code: Code, seq: int, epoch: int) -> Code:
    """``code`` numbered ``seq`` in ``epoch`` (both already checked by the caller)."""
    copy: Code = _new(Code)
    set_code_seq(copy, seq)
    set_code_epoch(copy, epoch)
    set_code_job(copy, code.job)
    set_code_attempt(copy, code.attempt)
    set_code_offset(copy, code.offset)
    set_code_data(copy, code.data)
    return copy


def decode_ack(body: bytes) -> Ack | None:
    """The per-ACK path: a well-formed ACK body, or None to take the generic path.

    Same contract as :func:`decode_code`: it accepts exactly what the generic
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
            max_bin_len=MAX_BIN,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
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
