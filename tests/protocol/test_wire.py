"""The 24-byte header: layout, every rejection rule, and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.wire import (
    ENCRYPTED_TYPES,
    HEADER_LEN,
    MAGIC,
    PLAINTEXT_TYPES,
    RELIABLE_TYPES,
    VERSION,
    Flag,
    Header,
    PacketType,
    check_protection,
    header_prefix,
    is_reliable,
    pack_header,
    pack_header_tail,
    unpack_header,
)

SESSION = 0x0123456789ABCDEF
PN = 0x0000000000000102

# Written out by hand from the layout table in PROTOCOL.md, not produced by the code.
CODE_HEADER_HEX = (
    "5643"  # magic "VC"
    "03"  # version
    "11"  # type CODE
    "01"  # flags: ENCRYPTED
    "00"  # reserved
    "0123456789abcdef"  # session id
    "0000000000000102"  # packet number
    "0004"  # body length
)


def datagram(body: bytes = b"", **fields: int) -> bytes:
    values = {
        "magic": MAGIC,
        "version": VERSION,
        "ptype": PacketType.PING,
        "flags": 1,
        "reserved": 0,
        "session_id": SESSION,
        "packet_number": PN,
        "body_length": len(body),
    }
    values.update(fields)
    return struct.pack(">HBBBBQQH", *values.values()) + body


def test_constants_match_the_spec() -> None:
    assert HEADER_LEN == 24 == limits.HEADER_LEN
    assert MAGIC.to_bytes(2, "big") == b"VC"
    assert VERSION == 3
    assert {t.name: t.value for t in PacketType} == {
        "HELLO": 0x01,
        "RETRY": 0x02,
        "CHALLENGE": 0x03,
        "ATTEST": 0x04,
        "KEY": 0x05,
        "REJECT": 0x06,
        "READY": 0x07,
        "START": 0x10,
        "CODE": 0x11,
        "END": 0x12,
        "RESULT": 0x13,
        "ACK": 0x14,
        "RESET": 0x15,
        "CHECKPOINT": 0x16,
        "PING": 0x20,
        "PONG": 0x21,
        "ERROR": 0x30,
    }
    assert int(Flag.ENCRYPTED) == 1


def test_pack_matches_hand_written_bytes() -> None:
    assert pack_header(PacketType.CODE, Flag.ENCRYPTED, SESSION, PN, 4).hex() == CODE_HEADER_HEX


def test_unpack_hand_written_bytes() -> None:
    header = unpack_header(bytes.fromhex(CODE_HEADER_HEX) + b"\xaa" * 4)
    assert header == Header(PacketType.CODE, Flag.ENCRYPTED, SESSION, PN, 4)
    assert header.ptype is PacketType.CODE
    assert header.flags is Flag.ENCRYPTED
    assert header.encrypted


def test_header_is_frozen() -> None:
    header = unpack_header(datagram())
    with pytest.raises(AttributeError):
        header.session_id = 1  # type: ignore[misc]


@pytest.mark.parametrize("size", [0, 1, HEADER_LEN - 1])
def test_short_datagram(size: int) -> None:
    with pytest.raises(DecodeError):
        unpack_header(datagram()[:size])


def test_longest_datagram_is_accepted_and_one_more_byte_is_not() -> None:
    body = bytes(limits.MAX_DATAGRAM - HEADER_LEN)
    assert unpack_header(datagram(body)).body_length == len(body)
    with pytest.raises(LimitExceeded):
        unpack_header(datagram(body + b"\x00", body_length=0xFFFF))


@pytest.mark.parametrize(
    "fields",
    [
        {"magic": 0x5644},
        {"magic": 0x4356},
        {"version": 0},
        {"version": 1},  # vcomp/1, before READY declared maxima
        {"version": 2},  # vcomp/2, before checkpoints travelled
        {"version": 4},
        {"ptype": 0x00},
        {"ptype": 0x08},
        {"ptype": 0x22},
        {"ptype": 0xFF},
        {"reserved": 1},
        {"reserved": 0x80},
        {"body_length": 1},
    ],
)
def test_each_header_rule(fields: dict[str, int]) -> None:
    with pytest.raises(DecodeError):
        unpack_header(datagram(b"", **fields))


@pytest.mark.parametrize("bit", range(1, 8))
def test_reserved_flag_bits(bit: int) -> None:
    with pytest.raises(DecodeError):
        unpack_header(datagram(flags=1 | (1 << bit)))


@pytest.mark.parametrize("claimed", [0, 3, 5, 0xFFFF])
def test_body_length_must_match_exactly(claimed: int) -> None:
    with pytest.raises(DecodeError):
        unpack_header(datagram(b"abcd", body_length=claimed))


def test_unknown_type_is_not_limit_exceeded() -> None:
    with pytest.raises(DecodeError) as info:
        unpack_header(datagram(ptype=0x99))
    assert not isinstance(info.value, LimitExceeded)


def test_pack_rejects_what_cannot_be_sent() -> None:
    with pytest.raises(LimitExceeded):
        pack_header(PacketType.CODE, 1, 1, 1, limits.MAX_BODY + 1)
    with pytest.raises(LimitExceeded):
        pack_header(PacketType.CODE, 1, 1 << 64, 1, 0)
    with pytest.raises(LimitExceeded):
        pack_header(PacketType.CODE, 1, 1, -1, 0)
    with pytest.raises(DecodeError):
        pack_header(PacketType.CODE, 2, 1, 1, 0)


def test_protection_rule_for_every_type() -> None:
    assert PLAINTEXT_TYPES.isdisjoint(ENCRYPTED_TYPES)
    assert PLAINTEXT_TYPES | ENCRYPTED_TYPES | {PacketType.ERROR} == set(PacketType)
    assert RELIABLE_TYPES <= ENCRYPTED_TYPES
    for ptype in PacketType:
        clear = Header(ptype, Flag(0), 1, 1, 0)
        sealed = Header(ptype, Flag.ENCRYPTED, 1, 1, 0)
        if ptype in PLAINTEXT_TYPES:
            check_protection(clear)
            with pytest.raises(DecodeError):
                check_protection(sealed)
        elif ptype in ENCRYPTED_TYPES:
            check_protection(sealed)
            with pytest.raises(DecodeError):
                check_protection(clear)
        else:
            check_protection(clear)
            check_protection(sealed)


def test_reliability_predicate() -> None:
    reliable = {t for t in PacketType if is_reliable(Header(t, Flag.ENCRYPTED, 1, 1, 0))}
    assert reliable == {
        PacketType.READY,
        PacketType.START,
        PacketType.CODE,
        PacketType.END,
        PacketType.RESULT,
        PacketType.CHECKPOINT,
        PacketType.ERROR,
    }
    assert not is_reliable(Header(PacketType.ERROR, Flag(0), 1, 1, 0))


@settings(max_examples=200, deadline=None)
@given(
    ptype=st.sampled_from(PacketType),
    flags=st.sampled_from([Flag(0), Flag.ENCRYPTED]),
    session_id=st.integers(0, 2**64 - 1),
    packet_number=st.integers(0, 2**64 - 1),
    body=st.binary(max_size=limits.MAX_BODY),
)
def test_round_trip(
    ptype: PacketType, flags: Flag, session_id: int, packet_number: int, body: bytes
) -> None:
    raw = pack_header(ptype, flags, session_id, packet_number, len(body)) + body
    assert len(raw) == HEADER_LEN + len(body)
    assert unpack_header(raw) == Header(ptype, flags, session_id, packet_number, len(body))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=limits.MAX_DATAGRAM + 8))
def test_random_bytes_raise_only_decode_error(raw: bytes) -> None:
    try:
        header = unpack_header(raw)
    except DecodeError:
        return
    assert header.body_length == len(raw) - HEADER_LEN


@settings(max_examples=300, deadline=None)
@given(
    ptype=st.sampled_from(PacketType),
    body=st.binary(max_size=64),
    position=st.integers(0, HEADER_LEN - 1),
    bit=st.integers(0, 7),
)
def test_flipped_header_bit_is_rejected_or_parsed_consistently(
    ptype: PacketType, body: bytes, position: int, bit: int
) -> None:
    raw = bytearray(pack_header(ptype, Flag.ENCRYPTED, SESSION, PN, len(body)) + body)
    raw[position] ^= 1 << bit
    try:
        header = unpack_header(bytes(raw))
    except DecodeError:
        assert position not in range(6, 22)  # ids are free-form: never rejected
        return
    assert position in range(3, 22)  # magic, version, reserved, length are all checked
    repacked = pack_header(
        header.ptype, header.flags, header.session_id, header.packet_number, header.body_length
    )
    assert repacked == bytes(raw[:HEADER_LEN])


def test_template_plus_tail_is_the_hand_written_header() -> None:
    header = header_prefix(PacketType.CODE, Flag.ENCRYPTED, SESSION) + pack_header_tail(PN, 4)
    assert header.hex() == CODE_HEADER_HEX


@settings(max_examples=200, deadline=None)
@given(
    ptype=st.sampled_from(PacketType),
    flags=st.sampled_from([Flag(0), Flag.ENCRYPTED]),
    session_id=st.integers(0, 2**64 - 1),
    packet_number=st.integers(0, 2**64 - 1),
    body_length=st.integers(0, limits.MAX_BODY),
)
def test_template_plus_tail_equals_pack_header(
    ptype: PacketType, flags: Flag, session_id: int, packet_number: int, body_length: int
) -> None:
    prefix = header_prefix(ptype, flags, session_id)
    assert prefix + pack_header_tail(packet_number, body_length) == pack_header(
        ptype, flags, session_id, packet_number, body_length
    )


def test_template_refuses_what_pack_header_refuses() -> None:
    with pytest.raises(DecodeError):
        header_prefix(PacketType.CODE, 2, SESSION)
    with pytest.raises(LimitExceeded):
        header_prefix(PacketType.CODE, 1, 2**64)
