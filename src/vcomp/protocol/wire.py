"""The fixed 24-byte packet header of vcomp/1 (PROTOCOL.md, "Header").

Layout (big-endian): magic "VC" (2), version (1), packet type (1), flags (1),
reserved (1), session id (8), packet number (8), body length (2). The header is
also the AEAD associated data of encrypted packets. Parsing runs for every
datagram, so it is one precompiled ``struct`` call plus table look-ups.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol.limits import HEADER_LEN, MAX_DATAGRAM

__all__ = [
    "ENCRYPTED_TYPES",
    "HEADER_LEN",
    "MAGIC",
    "PLAINTEXT_TYPES",
    "RELIABLE_TYPES",
    "VERSION",
    "Flag",
    "Header",
    "PacketType",
    "check_protection",
    "header_prefix",
    "is_reliable",
    "pack_header",
    "pack_header_tail",
    "unpack_header",
]

MAGIC: Final = 0x5643
"""The two bytes ``b"VC"`` read as a big-endian u16."""
VERSION: Final = 3


class PacketType(IntEnum):
    HELLO = 0x01
    RETRY = 0x02
    CHALLENGE = 0x03
    ATTEST = 0x04
    KEY = 0x05
    REJECT = 0x06
    READY = 0x07
    START = 0x10
    CODE = 0x11
    END = 0x12
    RESULT = 0x13
    ACK = 0x14
    RESET = 0x15
    CHECKPOINT = 0x16
    PING = 0x20
    PONG = 0x21
    ERROR = 0x30


class Flag(IntFlag):
    ENCRYPTED = 0x01


PLAINTEXT_TYPES: Final = frozenset(
    {
        PacketType.HELLO,
        PacketType.RETRY,
        PacketType.CHALLENGE,
        PacketType.ATTEST,
        PacketType.KEY,
        PacketType.REJECT,
    }
)
"""Handshake types: always sent in the clear (no key exists yet)."""

ENCRYPTED_TYPES: Final = frozenset(
    {
        PacketType.READY,
        PacketType.START,
        PacketType.CODE,
        PacketType.END,
        PacketType.RESULT,
        PacketType.CHECKPOINT,
        PacketType.ACK,
        PacketType.RESET,
        PacketType.PING,
        PacketType.PONG,
    }
)
"""Types that must carry the ENCRYPTED flag. ERROR is in neither set: it may be both."""

RELIABLE_TYPES: Final = frozenset(
    {
        PacketType.READY,
        PacketType.START,
        PacketType.CODE,
        PacketType.END,
        PacketType.RESULT,
        PacketType.CHECKPOINT,
    }
)
"""Types in the reliable stream (``seq``/``epoch``); encrypted ERROR is reliable too."""


@dataclass(frozen=True, slots=True)
class Header:
    ptype: PacketType
    flags: Flag
    session_id: int
    packet_number: int
    body_length: int

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & Flag.ENCRYPTED)


_HEADER: Final = struct.Struct(">HBBBBQQH")
assert _HEADER.size == HEADER_LEN

# The frozen dataclass __init__ goes through object.__setattr__ per field; the
# slot descriptors are twice as fast, which matters once per datagram.
_new = object.__new__
_set_ptype = Header.__dict__["ptype"].__set__
_set_flags = Header.__dict__["flags"].__set__
_set_session_id = Header.__dict__["session_id"].__set__
_set_packet_number = Header.__dict__["packet_number"].__set__
_set_body_length = Header.__dict__["body_length"].__set__

# Look-up tables: calling the enum classes per packet costs more than the parse.
_TYPE_BY_CODE: Final[dict[int, PacketType]] = {int(t): t for t in PacketType}
_FLAG_BY_BITS: Final[dict[int, Flag]] = {0: Flag(0), 1: Flag.ENCRYPTED}
_MAX_BODY_LEN: Final = MAX_DATAGRAM - HEADER_LEN


def pack_header(
    ptype: PacketType, flags: Flag | int, session_id: int, packet_number: int, body_length: int
) -> bytes:
    """The 24 header bytes; ``body_length`` is the length of the bytes that follow."""
    if not 0 <= body_length <= _MAX_BODY_LEN:
        raise LimitExceeded(f"body of {body_length} bytes does not fit in one datagram")
    if flags != 0 and flags != 1:
        raise DecodeError(f"undefined flag bits in {flags!r}")
    try:
        return _HEADER.pack(MAGIC, VERSION, ptype, flags, 0, session_id, packet_number, body_length)
    except struct.error:
        raise LimitExceeded("packet type, session id or packet number out of range") from None


HEADER_PREFIX_LEN: Final = 14
"""Magic, version, type, flags, reserved and session id: fixed for a session's packets."""
_TAIL: Final = struct.Struct(">QH")
assert HEADER_PREFIX_LEN + _TAIL.size == HEADER_LEN

pack_header_tail: Final = _TAIL.pack
"""``pack_header_tail(packet_number, body_length)``: the last 10 header bytes.

``header_prefix(t, f, s) + pack_header_tail(pn, n) == pack_header(t, f, s, pn, n)``
for every packet number and body length :func:`pack_header` accepts; the caller
checks both ranges (the record layer refuses packet numbers above u64, the codec
bodies longer than a datagram holds)."""


def header_prefix(ptype: PacketType, flags: Flag | int, session_id: int) -> bytes:
    """The first 14 header bytes of every ``ptype`` packet of one session: a template
    the per-packet path completes with :data:`pack_header_tail`."""
    return pack_header(ptype, flags, session_id, 0, 0)[:HEADER_PREFIX_LEN]


def unpack_header(datagram: bytes) -> Header:
    """Parse and check the header of a whole datagram.

    Raises :class:`LimitExceeded` for a datagram longer than the maximum and
    :class:`DecodeError` for anything else that is not a valid vcomp/1 header.
    """
    size = len(datagram)
    if size < HEADER_LEN:
        raise DecodeError(f"datagram of {size} bytes is shorter than the header")
    if size > MAX_DATAGRAM:
        raise LimitExceeded(f"datagram of {size} bytes exceeds {MAX_DATAGRAM}")
    magic, version, code, flag_bits, reserved, session_id, packet_number, body_length = (
        _HEADER.unpack_from(datagram)
    )
    if magic != MAGIC:
        raise DecodeError("bad magic")
    if version != VERSION:
        raise DecodeError(f"unsupported version {version}")
    ptype = _TYPE_BY_CODE.get(code)
    if ptype is None:
        raise DecodeError(f"unknown packet type {code:#04x}")
    flags = _FLAG_BY_BITS.get(flag_bits)
    if flags is None:
        raise DecodeError(f"reserved flag bits set ({flag_bits:#04x})")
    if reserved:
        raise DecodeError("reserved byte is not zero")
    if body_length != size - HEADER_LEN:
        raise DecodeError(
            f"body length field says {body_length}, datagram carries {size - HEADER_LEN}"
        )
    header: Header = _new(Header)
    _set_ptype(header, ptype)
    _set_flags(header, flags)
    _set_session_id(header, session_id)
    _set_packet_number(header, packet_number)
    _set_body_length(header, body_length)
    return header


def check_protection(header: Header) -> None:
    """Raise :class:`DecodeError` if the ENCRYPTED flag contradicts the type.

    Handshake types are never encrypted; session types always are; ERROR may be
    either (plaintext before a key exists, encrypted after).
    """
    if header.flags:
        if header.ptype in PLAINTEXT_TYPES:
            raise DecodeError(f"{header.ptype.name} must not be encrypted")
    elif header.ptype in ENCRYPTED_TYPES:
        raise DecodeError(f"{header.ptype.name} must be encrypted")


def is_reliable(header: Header) -> bool:
    """True if the packet belongs to the reliable stream (carries seq/epoch)."""
    return header.ptype in RELIABLE_TYPES or (
        header.ptype is PacketType.ERROR and bool(header.flags)
    )
