"""protocol/vectors/packets.json, checked in both directions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vcomp.protocol import messages
from vcomp.protocol.limits import AEAD_TAG_LEN, HEADER_LEN
from vcomp.protocol.messages import Message, decode_body, encode_body, encode_plaintext_packet
from vcomp.protocol.wire import Flag, Header, PacketType, pack_header, unpack_header

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "packets.json").read_text()
)["vectors"]

# Fields of msgpack type bin (hex in the JSON); pcr_values is an array of bins.
BIN_FIELDS = {
    "agent",
    "nonce",
    "cookie",
    "pad",
    "ephemeral",
    "quote",
    "signature",
    "wrapped",
    "server_key",
    "code_sha256",
    "input_sha256",
    "data",
    "sha256",
    "resume_sha256",
}


def field_value(name: str, value: Any) -> Any:
    if name in BIN_FIELDS:
        return bytes.fromhex(value)
    if name == "pcr_values":
        return tuple(bytes.fromhex(v) for v in value)
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def message_of(vector: dict[str, Any]) -> Message:
    cls = getattr(messages, vector["type"].title())
    message: Message = cls(**{k: field_value(k, v) for k, v in vector["fields"].items()})
    return message


def ids(vector: dict[str, Any]) -> str:
    return str(vector["name"])


def test_every_packet_type_has_a_vector() -> None:
    assert {PacketType(v["ptype"]) for v in VECTORS} == set(PacketType)
    for vector in VECTORS:
        assert PacketType[vector["type"]] == vector["ptype"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if not v["encrypted"]], ids=ids)
def test_plaintext_vector(vector: dict[str, Any]) -> None:
    expected = bytes.fromhex(vector["datagram"])
    message = message_of(vector)
    encoded = encode_plaintext_packet(message, vector["session_id"], vector["packet_number"])
    assert encoded.hex() == expected.hex()

    header = unpack_header(expected)
    ptype = PacketType(vector["ptype"])
    assert header == Header(
        ptype, Flag(0), vector["session_id"], vector["packet_number"], len(expected) - HEADER_LEN
    )
    assert decode_body(ptype, expected[HEADER_LEN:]) == message


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["encrypted"]], ids=ids)
def test_encrypted_vector(vector: dict[str, Any]) -> None:
    body = bytes.fromhex(vector["body"])
    header = bytes.fromhex(vector["header"])
    message = message_of(vector)
    assert encode_body(message).hex() == body.hex()

    ptype = PacketType(vector["ptype"])
    sealed_length = len(body) + AEAD_TAG_LEN
    sid, pn = vector["session_id"], vector["packet_number"]
    assert pack_header(ptype, Flag.ENCRYPTED, sid, pn, sealed_length) == header
    assert unpack_header(header + bytes(sealed_length)) == Header(
        ptype, Flag.ENCRYPTED, sid, pn, sealed_length
    )
    assert decode_body(ptype, body) == message


def test_hello_vectors_are_exactly_the_minimum_size() -> None:
    for vector in VECTORS:
        if vector["type"] == "HELLO":
            assert len(bytes.fromhex(vector["datagram"])) == 1200


def test_the_hand_decoded_examples_in_the_spec_are_the_vectors() -> None:
    """PROTOCOL.md section 15 decodes `ping` and `retry` byte by byte; those bytes must
    be the vectors' (they once kept version 1 after the vectors moved on)."""
    spec = (Path(__file__).resolve().parents[2] / "protocol" / "PROTOCOL.md").read_text()
    section = spec.split("## 15. Test vectors", 1)[1]
    blocks = section.split("```")[1::2]
    by_name = {v["name"]: v for v in VECTORS}

    def hex_of(line: str) -> str:
        words = line.split()
        return "".join(w for w in words if all(c in "0123456789abcdef" for c in w))

    ping_lines = blocks[0].strip("\n").splitlines()
    assert hex_of(ping_lines[0].removeprefix("header")) == by_name["ping"]["header"]
    body = "".join(hex_of(ln.removeprefix("body").strip().split("  ")[0]) for ln in ping_lines[2:])
    assert body == by_name["ping"]["body"]
    retry = "".join(hex_of(ln[:60]) for ln in blocks[1].strip("\n").splitlines())
    assert retry == by_name["retry"]["datagram"]
