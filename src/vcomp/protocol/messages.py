"""Packet bodies of vcomp/1: the message types and the codec.

A body is a msgpack map with str keys (PROTOCOL.md, "Bodies"). The message
classes are defined in :mod:`vcomp.protocol.bodies` and (CODE, ACK)
:mod:`vcomp.protocol.fastpath`, their field checks in :mod:`vcomp.protocol.schema`;
this module is where to import all of them from.

:func:`decode_body` turns any byte string into a valid message or raises
:class:`~vcomp.errors.DecodeError` (or its subclass
:class:`~vcomp.errors.LimitExceeded`), never anything else. Lengths are checked
before msgpack allocates: the body length first, then msgpack's own per-object
limits, then the exact schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Final, TypeAlias, TypeVar, get_args

import msgpack

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.bodies import JOB_KINDS as JOB_KINDS
from vcomp.protocol.bodies import (
    Attest,
    Challenge,
    Checkpoint,
    End,
    Error,
    ErrorCode,
    Hello,
    Key,
    Ping,
    Pong,
    Ready,
    Reject,
    Reset,
    Result,
    Retry,
    Start,
)
from vcomp.protocol.fastpath import (
    PACKER,
    Ack,
    Code,
    code_with_sequence,
    decode_ack,
    decode_code,
)
from vcomp.protocol.schema import MAX_ARRAY, MAX_BIN, MAX_MAP, MAX_STR, u32, u64, validate_field
from vcomp.protocol.schema import MAX_TRANSFER as MAX_TRANSFER
from vcomp.protocol.schema import U8 as U8
from vcomp.protocol.schema import U16 as U16
from vcomp.protocol.schema import U32 as U32
from vcomp.protocol.schema import U64 as U64
from vcomp.protocol.schema import Check as Check
from vcomp.protocol.wire import Header, PacketType, pack_header, unpack_header

__all__ = [
    "Ack",
    "Attest",
    "Challenge",
    "Checkpoint",
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


Message: TypeAlias = (
    Hello | Retry | Challenge | Attest | Key | Reject | Ready | Start | Code | End | Result
    | Checkpoint | Ack | Reset | Ping | Pong | Error
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

# One packer for the codec (fastpath's): Packer.pack runs entirely under the GIL
# for the plain types a validated message holds, and reusing it saves its set-up cost.
_pack = PACKER.pack
_unpackb: Final = msgpack.unpackb
_new: Final = object.__new__

_CODE: Final = PacketType.CODE  # enum attribute look-ups are slow on the hot path
_MAX_PLAINTEXT_BODY: Final = limits.MAX_PLAINTEXT_BODY
_ACK: Final = PacketType.ACK
_FIXMAP_FIRST: Final = 0x80
_FIXMAP_LAST: Final = 0x8F
_MAP16: Final = 0xDE


def encode_body(message: Message) -> bytes:
    """The msgpack body of ``message`` (already validated when it was built).

    A HELLO too short for the anti-amplification minimum is sent as
    :func:`pad_hello` of itself, so an unpadded HELLO can never leave.
    """
    # One CODE or ACK per datagram: no layout look-up (both have only the maximum
    # size, asserted in fastpath, which also owns their maps).
    body: bytes
    if type(message) is Code or type(message) is Ack:
        body = _pack(message._to_map())
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


def decode_body(ptype: PacketType | int, body: bytes) -> Message:
    """Decode and validate the body of a packet of type ``ptype``.

    Raises only :class:`DecodeError` (and its subclass :class:`LimitExceeded`).
    """
    if ptype is _CODE:
        code = decode_code(body)
        if code is not None:
            return code
    elif ptype is _ACK:
        ack = decode_ack(body)
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
            max_bin_len=MAX_BIN,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
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


Sequenced = TypeVar("Sequenced", Ready, Start, Code, End, Result, Checkpoint, Error)


def with_sequence(message: Sequenced, seq: int, epoch: int) -> Sequenced:
    """A copy of a reliable message numbered ``seq`` in ``epoch``.

    Same result as ``dataclasses.replace(message, seq=seq, epoch=epoch)`` at a
    fraction of the cost; the other fields were validated when ``message`` was built.
    """
    cls = type(message)
    if not (type(seq) is int and type(epoch) is int and 0 <= seq <= U64 and 0 <= epoch <= U32):
        # Off the fast path: int subclasses pass here, anything else is named.
        validate_field(cls, "seq", u64, seq)
        validate_field(cls, "epoch", u32, epoch)
    if cls is Code:
        # Once per CODE packet sent (Any: no isinstance cost).
        code: Any = message
        renumbered: Sequenced = code_with_sequence(code, seq, epoch)
        return renumbered
    copy: Sequenced = _new(cls)
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
