from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.errors import DecodeError
from vcomp.protocol import tpm_format as tf

VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "protocol" / "vectors" / "quote.json").read_text()
)


def vector_attest() -> tf.Attest:
    c = VECTOR["clock_info"]
    return tf.Attest(
        magic=tf.TPM_GENERATED_VALUE,
        type=tf.TPM_ST_ATTEST_QUOTE,
        qualified_signer=bytes.fromhex(VECTOR["ak_name"]),
        extra_data=bytes.fromhex(VECTOR["extra_data"]),
        clock_info=tf.ClockInfo(c["clock"], c["reset_count"], c["restart_count"], c["safe"]),
        firmware_version=VECTOR["firmware_version"],
        pcr_select=(tf.PcrSelection.sha256(VECTOR["pcr_selection"]["pcrs"]),),
        pcr_digest=bytes.fromhex(VECTOR["pcr_digest"]),
    )


def test_vector_encodes_to_golden_bytes() -> None:
    assert tf.encode_attest(vector_attest()).hex() == VECTOR["tpms_attest"]


def test_vector_decodes_to_golden_fields() -> None:
    assert tf.decode_attest(bytes.fromhex(VECTOR["tpms_attest"])) == vector_attest()


def test_vector_pcr_digest_and_selection() -> None:
    values = [bytes.fromhex(VECTOR["pcr_values"][k]) for k in ("17", "18")]
    assert tf.pcr_digest(values).hex() == VECTOR["pcr_digest"]
    assert hashlib.sha256(values[0] + values[1]).hexdigest() == VECTOR["pcr_digest"]
    sel = tf.encode_pcr_selection((tf.PcrSelection.sha256([18, 17]),))
    assert sel.hex() == VECTOR["tpml_pcr_selection"] == "00000001000b03000006"


def test_vector_signature_encoding() -> None:
    raw = bytes.fromhex(VECTOR["tpmt_signature"])
    sig = tf.decode_signature(raw)
    assert sig.hash_alg == tf.TPM_ALG_SHA256 and len(sig.signature) == 256
    assert raw[:6] == bytes.fromhex("0014000b0100")
    assert tf.encode_signature(sig) == raw


def test_quote_offsets_for_two_pcr_selection() -> None:
    # The byte layout protocol/spec/attestation.md documents.
    raw = bytes.fromhex(VECTOR["tpms_attest"])
    assert len(raw) == 145
    assert raw[0:4] == b"\xffTCG"
    assert raw[4:6] == b"\x80\x18"
    assert raw[6:8] == b"\x00\x22" and raw[8:42].hex() == VECTOR["ak_name"]
    assert raw[42:44] == b"\x00\x20" and raw[44:76].hex() == VECTOR["extra_data"]
    clock, reset, restart, safe = struct.unpack(">QIIB", raw[76:93])
    assert (clock, reset, restart, safe) == (0x123456789, 7, 2, 1)
    assert struct.unpack(">Q", raw[93:101])[0] == VECTOR["firmware_version"]
    assert raw[101:111].hex() == VECTOR["tpml_pcr_selection"]
    assert raw[111:113] == b"\x00\x20" and raw[113:145].hex() == VECTOR["pcr_digest"]


def test_ak_public_area_and_name() -> None:
    area = bytes.fromhex(VECTOR["ak_tpmt_public"])
    assert area[:10] == bytes.fromhex("0001000b000500720000")  # RSA, SHA-256, attrs, no policy
    assert area[10:18] == bytes.fromhex("00100014000b0800")  # NULL sym, RSASSA-SHA256, 2048
    assert area[18:22] == bytes(4)  # exponent 0 means 65537
    assert area[22:24] == b"\x01\x00" and len(area) == 24 + 256
    assert tf.object_name(area) == b"\x00\x0b" + hashlib.sha256(area).digest()
    assert tf.object_name(area).hex() == VECTOR["ak_name"]


def test_policy_pcr_digest_by_hand() -> None:
    sel = (tf.PcrSelection.sha256([17, 18]),)
    digest = bytes.fromhex(VECTOR["pcr_digest"])
    by_hand = hashlib.sha256(
        bytes(32) + bytes.fromhex("0000017f") + bytes.fromhex("00000001000b03000006") + digest
    ).digest()
    assert tf.policy_pcr_digest(sel, digest) == by_hand
    assert by_hand.hex() == VECTOR["policy_pcr_digest"]


def test_extend_is_hash_of_concatenation() -> None:
    m = hashlib.sha256(b"m").digest()
    assert tf.extend(bytes(32), m) == hashlib.sha256(bytes(32) + m).digest()


def test_selection_is_sorted_unique_and_bounded() -> None:
    assert tf.PcrSelection.sha256([18, 17, 18]).pcrs == (17, 18)
    with pytest.raises(ValueError):
        tf.PcrSelection.sha256([24])


def test_decode_rejects_non_quote_type_and_trailing_bytes() -> None:
    raw = bytes.fromhex(VECTOR["tpms_attest"])
    with pytest.raises(DecodeError, match="type"):
        tf.decode_attest(raw[:4] + b"\x80\x17" + raw[6:])
    with pytest.raises(DecodeError, match="trailing"):
        tf.decode_attest(raw + b"\x00")
    with pytest.raises(DecodeError, match="safe"):
        tf.decode_attest(raw[:92] + b"\x02" + raw[93:])
    with pytest.raises(DecodeError, match="sizeofSelect"):
        tf.decode_attest(raw[:107] + b"\x04" + raw[108:111] + b"\x00" + raw[111:])


def test_decode_any_magic_so_the_verifier_can_name_it() -> None:
    raw = bytes.fromhex(VECTOR["tpms_attest"])
    assert tf.decode_attest(b"\x00" * 4 + raw[4:]).magic == 0


# ------------------------------------------------------------ properties

digests = st.binary(min_size=0, max_size=tf.MAX_DIGEST_SIZE)
attests = st.builds(
    tf.Attest,
    magic=st.integers(0, 2**32 - 1),
    type=st.just(tf.TPM_ST_ATTEST_QUOTE),
    qualified_signer=st.binary(max_size=tf.MAX_NAME_SIZE),
    extra_data=st.binary(max_size=tf.MAX_DATA_SIZE),
    clock_info=st.builds(
        tf.ClockInfo,
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.booleans(),
    ),
    firmware_version=st.integers(0, 2**64 - 1),
    pcr_select=st.lists(
        st.builds(
            tf.PcrSelection,
            st.integers(0, 0xFFFF),
            st.lists(st.integers(0, 23), max_size=24).map(tuple),
        ),
        max_size=4,
    ).map(tuple),
    pcr_digest=digests,
)


@given(attests)
def test_attest_round_trip(attest: tf.Attest) -> None:
    assert tf.decode_attest(tf.encode_attest(attest)) == attest


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    for decode in (tf.decode_attest, tf.decode_signature, tf.decode_pcr_selection):
        with contextlib.suppress(DecodeError):
            decode(data)


@given(attests, st.data())
def test_mutated_quotes_raise_only_decode_error(attest: tf.Attest, data: st.DataObject) -> None:
    raw = bytearray(tf.encode_attest(attest))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw)))
        if op == "flip" and pos < len(raw):
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        decoded = tf.decode_attest(bytes(raw))
    except DecodeError:
        return
    # Decoding is strict, so whatever it accepts re-encodes to the same bytes.
    assert tf.encode_attest(decoded) == bytes(raw)


@given(st.integers(0, 0xFFFF), st.binary(max_size=tf.MAX_RSA_SIGNATURE_SIZE))
def test_signature_round_trip(hash_alg: int, sig: bytes) -> None:
    s = tf.RsassaSignature(hash_alg, sig)
    assert tf.decode_signature(tf.encode_signature(s)) == s


def test_signature_rejects_other_schemes_and_oversize() -> None:
    with pytest.raises(DecodeError, match="RSASSA"):
        tf.decode_signature(bytes.fromhex("0018000b0000"))  # ECDSA
    with pytest.raises(DecodeError, match="exceeds"):
        tf.decode_signature(bytes.fromhex("0014000b0201") + bytes(513))


def test_encode_refuses_oversized_fields() -> None:
    with pytest.raises(ValueError):
        tf.encode_attest(dataclasses.replace(vector_attest(), extra_data=bytes(67)))
