"""Record protection: golden vectors, tamper rejection, nonce discipline, usage limits."""

from __future__ import annotations

import copy
import json
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.errors import AuthenticationFailed, CryptoError, KeyExhausted
from vcomp.protocol.record import (
    TAG_LEN,
    Direction,
    PacketNumberReused,
    RecordKey,
    nonce_for,
)

VECTORS_PATH = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "record.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]

KEY = bytes(range(32))
S2A = Direction.SERVER_TO_AGENT
A2S = Direction.AGENT_TO_SERVER


def header_for(packet_number: int, body_length: int, ptype: int = 0x11) -> bytes:
    """A 24-byte header laid out as in CONTRACT.md (built here, not by wire.py)."""
    return (
        b"VC\x03"
        + bytes([ptype, 0x01, 0x00])
        + (0xABCDEF).to_bytes(8, "big")
        + packet_number.to_bytes(8, "big")
        + body_length.to_bytes(2, "big")
    )


def packet_number_of(header: bytes) -> int:
    return int.from_bytes(header[14:22], "big")


def plaintext_of(vector: dict[str, Any]) -> bytes:
    if "plaintext" in vector:
        return bytes.fromhex(vector["plaintext"])
    rule = vector["plaintext_pattern"]
    assert rule["rule"] == "index_mod_256"
    return bytes(i % 256 for i in range(rule["length"]))


def pair(**limits: int) -> tuple[RecordKey, RecordKey]:
    """(server key, agent key) for the same session key."""
    return RecordKey(KEY, send=S2A, **limits), RecordKey(KEY, send=A2S, **limits)


# ---- golden vectors ----------------------------------------------------------


def test_vector_file_covers_the_required_cases() -> None:
    assert len(VECTORS) >= 4
    assert {v["direction"] for v in VECTORS} == {1, 2}
    assert any(v["packet_number"] == 0 for v in VECTORS)
    assert any(v["packet_number"] >= 2**32 for v in VECTORS)
    lengths = {len(plaintext_of(v)) for v in VECTORS}
    assert 0 in lengths
    assert max(lengths) >= 1200


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_nonce(vector: dict[str, Any]) -> None:
    assert (
        nonce_for(Direction(vector["direction"]), vector["packet_number"]).hex()
        == (vector["nonce"])
    )


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_seal(vector: dict[str, Any]) -> None:
    key = RecordKey(bytes.fromhex(vector["key"]), send=Direction(vector["direction"]))
    header = bytes.fromhex(vector["header"])
    assert packet_number_of(header) == vector["packet_number"]
    sealed = key.seal(header, vector["packet_number"], plaintext_of(vector))
    assert sealed.hex() == vector["sealed"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_open(vector: dict[str, Any]) -> None:
    receiver = Direction(vector["direction"]).reverse
    key = RecordKey(bytes.fromhex(vector["key"]), send=receiver)
    header = bytes.fromhex(vector["header"])
    opened = key.open(header, vector["packet_number"], bytes.fromhex(vector["sealed"]))
    assert opened == plaintext_of(vector)
    assert key.forgeries == 0


def test_nonce_layout() -> None:
    assert nonce_for(S2A, 0) == bytes.fromhex("00000001" + "00" * 8)
    assert nonce_for(A2S, 2**64 - 1) == bytes.fromhex("00000002" + "ff" * 8)
    assert nonce_for(S2A, 0x0102030405060708)[4:] == bytes(range(1, 9))
    for bad in (-1, 2**64):
        with pytest.raises(CryptoError):
            nonce_for(S2A, bad)


# ---- round trips and tampering -------------------------------------------------


@given(
    packet_number=st.integers(0, 2**64 - 1),
    plaintext=st.binary(max_size=1400),
    server_sends=st.booleans(),
)
def test_round_trip(packet_number: int, plaintext: bytes, server_sends: bool) -> None:
    server, agent = pair()
    sender, receiver = (server, agent) if server_sends else (agent, server)
    header = header_for(packet_number, len(plaintext) + TAG_LEN)
    sealed = sender.seal(header, packet_number, plaintext)
    assert len(sealed) == len(plaintext) + TAG_LEN
    assert receiver.open(header, packet_number, sealed) == plaintext


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def assert_rejected(receiver: RecordKey, datagram: bytes) -> None:
    """Open a datagram the way a receiver would: the packet number comes from its header."""
    header, body = datagram[:24], datagram[24:]
    before = receiver.forgeries
    with pytest.raises(AuthenticationFailed):
        receiver.open(header, packet_number_of(header), body)
    assert receiver.forgeries == before + 1


def sealed_datagram(sender: RecordKey, packet_number: int, plaintext: bytes) -> bytes:
    header = header_for(packet_number, len(plaintext) + TAG_LEN)
    return header + sender.seal(header, packet_number, plaintext)


def test_every_bit_flip_of_a_small_packet_is_rejected() -> None:
    server, agent = pair()
    datagram = sealed_datagram(server, 5, b"small body")  # 24 + 10 + 16 bytes
    assert agent.open(datagram[:24], 5, datagram[24:]) == b"small body"
    for bit in range(len(datagram) * 8):
        assert_rejected(agent, flipped(datagram, bit))
    assert agent.forgeries == len(datagram) * 8


def test_sampled_bit_flips_of_a_big_packet_are_rejected() -> None:
    server, agent = pair()
    datagram = sealed_datagram(server, 2**40 + 3, bytes(range(256)) * 5)  # 1280-byte body
    nbits = len(datagram) * 8
    rng = random.Random(6479)
    header_bits = range(24 * 8)
    tag_bits = range(nbits - TAG_LEN * 8, nbits)
    sample = set(header_bits) | set(tag_bits) | set(rng.sample(range(nbits), 600))
    for bit in sorted(sample):
        assert_rejected(agent, flipped(datagram, bit))


def test_truncated_and_extended_bodies_are_rejected() -> None:
    server, agent = pair()
    datagram = sealed_datagram(server, 1, b"payload")
    header, body = datagram[:24], datagram[24:]
    for bad in (body[:-1], body + b"\x00", body[1:]):
        with pytest.raises(AuthenticationFailed):
            agent.open(header, 1, bad)


def test_body_shorter_than_a_tag_is_rejected_without_counting() -> None:
    _, agent = pair()
    for length in range(TAG_LEN):
        with pytest.raises(AuthenticationFailed):
            agent.open(header_for(0, length), 0, bytes(length))
    assert agent.forgeries == 0


def test_wrong_packet_number_is_rejected() -> None:
    server, agent = pair()
    header = header_for(9, 4 + TAG_LEN)
    sealed = server.seal(header, 9, b"data")
    with pytest.raises(AuthenticationFailed):
        agent.open(header, 10, sealed)


def test_wrong_direction_is_rejected() -> None:
    server, agent = pair()
    header = header_for(3, 4 + TAG_LEN)
    sealed = server.seal(header, 3, b"data")
    # A packet reflected back to its sender, or one sealed by a peer using the wrong
    # direction, uses the other nonce prefix and fails.
    other_server = RecordKey(KEY, send=S2A)
    with pytest.raises(AuthenticationFailed):
        other_server.open(header, 3, sealed)
    with pytest.raises(AuthenticationFailed):
        server.open(header, 3, sealed)
    assert agent.open(header, 3, sealed) == b"data"


def test_wrong_key_is_rejected() -> None:
    server, _ = pair()
    stranger = RecordKey(bytes(32), send=A2S)
    header = header_for(0, TAG_LEN)
    with pytest.raises(AuthenticationFailed):
        stranger.open(header, 0, server.seal(header, 0, b""))


# ---- packet-number discipline ----------------------------------------------------


def test_seal_refuses_reused_or_decreasing_packet_numbers() -> None:
    server, _ = pair()
    server.seal(header_for(4, TAG_LEN), 4, b"")
    for pn in (4, 3, 0):
        with pytest.raises(PacketNumberReused):
            server.seal(header_for(pn, TAG_LEN), pn, b"")
    assert server.packets_sealed == 1
    server.seal(header_for(5, TAG_LEN), 5, b"")  # the next number still works
    server.seal(header_for(100, TAG_LEN), 100, b"")  # gaps are allowed
    assert server.packets_sealed == 3


def test_first_sealed_packet_number_may_be_above_zero() -> None:
    # Plaintext handshake packets use the low numbers; encryption starts later.
    server, agent = pair()
    header = header_for(3, TAG_LEN)
    assert agent.open(header, 3, server.seal(header, 3, b"")) == b""


def test_seal_rejects_out_of_range_packet_numbers_and_bad_headers() -> None:
    server, _ = pair()
    with pytest.raises(CryptoError):
        server.seal(header_for(0, TAG_LEN), 2**64, b"")
    with pytest.raises(CryptoError):
        server.seal(header_for(0, TAG_LEN)[:23], 0, b"")
    with pytest.raises(CryptoError):
        server.seal(header_for(0, TAG_LEN) + b"\x00", 0, b"")
    assert server.packets_sealed == 0
    server.seal(header_for(0, TAG_LEN), 0, b"")  # nothing above consumed a number


def test_open_rejects_bad_header_length() -> None:
    server, agent = pair()
    header = header_for(0, TAG_LEN)
    sealed = server.seal(header, 0, b"")
    with pytest.raises(CryptoError):
        agent.open(header[:20], 0, sealed)
    assert agent.forgeries == 0


# ---- usage limits ------------------------------------------------------------------


def test_packet_limit_retires_sealing() -> None:
    server, agent = pair(packet_limit=3)
    for pn in range(3):
        header = header_for(pn, TAG_LEN)
        agent.open(header, pn, server.seal(header, pn, b""))
    assert server.exhausted
    with pytest.raises(KeyExhausted):
        server.seal(header_for(3, TAG_LEN), 3, b"")
    assert server.packets_sealed == 3
    # Opening is governed by the forgery limit only.
    header = header_for(0, TAG_LEN)
    assert server.open(header, 0, agent.seal(header, 0, b"")) == b""


def test_forgery_limit_retires_opening() -> None:
    server, agent = pair(forgery_limit=3)
    header = header_for(0, 4 + TAG_LEN)
    sealed = server.seal(header, 0, b"data")
    bad = flipped(sealed, 0)
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            agent.open(header, 0, bad)
    assert (agent.forgeries, agent.exhausted) == (2, False)
    with pytest.raises(KeyExhausted):  # the third forgery ends it at once
        agent.open(header, 0, bad)
    assert (agent.forgeries, agent.exhausted) == (3, True)
    with pytest.raises(KeyExhausted):  # even authentic packets are refused now
        agent.open(header, 0, sealed)
    assert agent.forgeries == 3


def test_default_limits() -> None:
    server, _ = pair()
    assert server.packet_limit == 2**23
    assert server.forgery_limit == 2**20


def test_invalid_construction() -> None:
    for bad_key in (b"", bytes(16), bytes(31), bytes(33)):
        with pytest.raises(CryptoError):
            RecordKey(bad_key, send=S2A)
    with pytest.raises(CryptoError):
        RecordKey(KEY, send=S2A, packet_limit=0)
    with pytest.raises(CryptoError):
        RecordKey(KEY, send=S2A, forgery_limit=0)


# ---- key hygiene ---------------------------------------------------------------------


def test_key_never_appears_in_repr_or_str() -> None:
    secret = bytes.fromhex("5ec7e7" * 10 + "ab12")
    key = RecordKey(secret, send=A2S)
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        assert secret.hex() not in text.lower()
        assert repr(secret) not in text
        assert "5ec7e7" not in text.lower()
        assert "AGENT_TO_SERVER" in text


def test_key_is_not_kept_as_an_attribute() -> None:
    secret = bytes.fromhex("42" * 32)
    key = RecordKey(secret, send=S2A)
    assert not hasattr(key, "__dict__")
    for name in RecordKey.__slots__:
        value = getattr(key, name)
        assert value != secret
        assert not (isinstance(value, bytes) and secret in value)


def test_key_cannot_be_pickled_or_copied() -> None:
    key = RecordKey(KEY, send=S2A)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        copy.copy(key)


def test_wipe_disables_the_key() -> None:
    server, agent = pair()
    header = header_for(0, TAG_LEN)
    sealed = server.seal(header, 0, b"")
    server.wipe()
    agent.wipe()
    assert "wiped" in repr(server)
    with pytest.raises(CryptoError):
        server.seal(header_for(1, TAG_LEN), 1, b"")
    with pytest.raises(CryptoError):
        agent.open(header, 0, sealed)


# ---- trains: many packets per call -------------------------------------------------


def train_of(first_pn: int, count: int) -> list[tuple[bytes, int, bytes]]:
    return [
        (header_for(pn, 100 + pn % 7 + TAG_LEN), pn, bytes([pn % 256]) * (100 + pn % 7))
        for pn in range(first_pn, first_pn + count)
    ]


def test_a_train_sealed_in_one_call_opens_packet_by_packet() -> None:
    server, agent = pair()
    packets = train_of(5, 64)
    datagrams = server.seal_train(packets)
    assert server.packets_sealed == 64
    for (header, pn, plaintext), datagram in zip(packets, datagrams, strict=True):
        assert datagram[:24] == header
        assert agent.open(datagram[:24], pn, datagram[24:]) == plaintext


def test_packets_sealed_one_by_one_open_as_a_train_and_match_seal() -> None:
    server, agent = pair()
    packets = train_of(0, 16)
    singly = [header + server.seal(header, pn, plaintext) for header, pn, plaintext in packets]
    assert pair()[0].seal_train(packets) == singly  # the same bytes either way
    assert agent.open_train([(d, pn) for d, (_, pn, _) in zip(singly, packets, strict=True)]) == [
        plaintext for _, _, plaintext in packets
    ]


def test_a_corrupted_packet_inside_a_train_is_dropped_alone() -> None:
    server, agent = pair()
    packets = train_of(0, 8)
    datagrams = server.seal_train(packets)
    datagrams[3] = flipped(datagrams[3], 8 * 30)  # a ciphertext bit
    datagrams[5] = datagrams[5][:30]  # too short for a tag: not counted as a forgery
    opened = agent.open_train([(d, pn) for d, (_, pn, _) in zip(datagrams, packets, strict=True)])
    assert [i for i, p in enumerate(opened) if p is None] == [3, 5]
    for i in (0, 1, 2, 4, 6, 7):
        assert opened[i] == packets[i][2]
    assert agent.forgeries == 1


def test_a_train_reaching_the_forgery_limit_ends_opening() -> None:
    server, agent = pair(forgery_limit=2)
    packets = train_of(0, 4)
    datagrams = [flipped(d, 8 * 40) for d in server.seal_train(packets)]
    with pytest.raises(KeyExhausted):
        agent.open_train([(d, pn) for d, (_, pn, _) in zip(datagrams, packets, strict=True)])
    assert (agent.forgeries, agent.exhausted) == (2, True)
    with pytest.raises(KeyExhausted):
        agent.open_train([(server.seal_train(train_of(10, 1))[0], 10)])


def test_a_refused_train_seals_nothing_and_names_the_first_bad_packet() -> None:
    server, _ = pair(packet_limit=10)
    server.seal_train(train_of(0, 2))
    reused = train_of(2, 3) + train_of(3, 1)  # 2, 3, 4, then 3 again
    with pytest.raises(PacketNumberReused, match=r"packet number 3 is not above .* \(4\)"):
        server.seal_train(reused)
    with pytest.raises(PacketNumberReused):
        server.seal_train(train_of(1, 2))
    bad_header = train_of(2, 3)
    bad_header[1] = (bad_header[1][0][:23], bad_header[1][1], bad_header[1][2])
    with pytest.raises(CryptoError, match="header must be 24 bytes"):
        server.seal_train(bad_header)
    with pytest.raises(KeyExhausted):
        server.seal_train(train_of(2, 9))  # 2 + 9 > 10
    assert server.packets_sealed == 2
    assert len(server.seal_train(train_of(2, 8))) == 8  # exactly up to the limit
    assert server.exhausted
    assert server.seal_train([]) == []


def test_wiped_keys_refuse_trains() -> None:
    server, agent = pair()
    server.wipe()
    agent.wipe()
    with pytest.raises(CryptoError, match="wiped"):
        server.seal_train(train_of(0, 1))
    with pytest.raises(CryptoError, match="wiped"):
        agent.open_train([(bytes(64), 0)])
