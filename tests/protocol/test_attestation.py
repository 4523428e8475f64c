"""The verifier: the happy path, then one-change negative tests (Keylime style), one per reason."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vcomp.errors import AttestationError, ConfigError
from vcomp.protocol import attestation as at
from vcomp.protocol import tpm_format as tf
from vcomp.protocol.attestation import Measurement, NonceBook

VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "protocol" / "vectors" / "quote.json").read_text()
)
_key = serialization.load_pem_private_key(
    VECTOR["ak_private_key_pem_test_only"].encode(), password=None
)
assert isinstance(_key, rsa.RSAPrivateKey)
AK: rsa.RSAPrivateKey = _key
EPHEMERAL = bytes.fromhex(VECTOR["ephemeral_spki_der"])
PCR17 = bytes.fromhex(VECTOR["pcr_values"]["17"])
PCR18 = bytes.fromhex(VECTOR["pcr_values"]["18"])
GOLDEN = Measurement.parse(VECTOR["measurement"])
NOW = 1000.0


def sign(attest: bytes, key: rsa.RSAPrivateKey = AK) -> bytes:
    raw = key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
    return tf.encode_signature(tf.RsassaSignature(tf.TPM_ALG_SHA256, raw))


@dataclasses.dataclass
class Case:
    """One verify_quote call; tests change exactly one thing before calling it."""

    book: NonceBook
    nonce: bytes
    attest: tf.Attest
    pcr_values: list[bytes]
    quote: bytes = b""
    signature: bytes = b""
    ak: rsa.RSAPublicKey | None = dataclasses.field(default_factory=AK.public_key)
    server_nonce: bytes = b""
    now: float = NOW + 1
    requested: tuple[int, ...] = (17, 18)
    from_allowlist: bool = False
    allowlist: frozenset[Measurement] = frozenset({GOLDEN})
    previous_clock: tf.ClockInfo | None = None

    def resign(self, **changes: Any) -> None:
        self.attest = dataclasses.replace(self.attest, **changes)
        self.quote = tf.encode_attest(self.attest)
        self.signature = sign(self.quote)

    def verify(self) -> at.VerifiedQuote:
        return at.verify_quote(
            ak_public_key=self.ak,
            quote=self.quote,
            signature=self.signature,
            pcr_values=self.pcr_values,
            server_nonce=self.server_nonce,
            ephemeral_spki_der=EPHEMERAL,
            nonce_book=self.book,
            now=self.now,
            requested_pcrs=self.requested,
            selection_from_allowlist=self.from_allowlist,
            allowlist=self.allowlist,
            previous_clock=self.previous_clock,
        )


@pytest.fixture
def case() -> Case:
    book = NonceBook()
    nonce = book.issue(NOW)
    attest = tf.Attest(
        magic=tf.TPM_GENERATED_VALUE,
        type=tf.TPM_ST_ATTEST_QUOTE,
        qualified_signer=at.ak_name(AK.public_key()),
        extra_data=at.expected_extra_data(nonce, EPHEMERAL),
        clock_info=tf.ClockInfo(50_000, 3, 0, True),
        firmware_version=1,
        pcr_select=(tf.PcrSelection.sha256([17, 18]),),
        pcr_digest=tf.pcr_digest([PCR17, PCR18]),
    )
    c = Case(book, nonce, attest, [PCR17, PCR18], server_nonce=nonce)
    c.resign()
    return c


def reason_of(c: Case) -> str:
    with pytest.raises(AttestationError) as info:
        c.verify()
    assert info.value.reason in at.REASONS
    return info.value.reason


def test_happy_path(case: Case) -> None:
    v = case.verify()
    assert v.agent_id == hashlib.sha256(at.spki_der(AK.public_key())).digest()
    assert v.agent_id.hex() == VECTOR["agent_id"]
    assert v.measurement == GOLDEN
    assert v.clock_info == tf.ClockInfo(50_000, 3, 0, True)
    assert v.qualified_signer == at.ak_name(AK.public_key())
    assert len(case.book) == 0  # the nonce was consumed


def test_golden_vector_verifies() -> None:
    book = NonceBook()
    nonce = book.issue(NOW, lambda n: bytes.fromhex(VECTOR["server_nonce"]))
    v = at.verify_quote(
        ak_public_key=AK.public_key(),
        quote=bytes.fromhex(VECTOR["tpms_attest"]),
        signature=bytes.fromhex(VECTOR["tpmt_signature"]),
        pcr_values=[PCR17, PCR18],
        server_nonce=nonce,
        ephemeral_spki_der=EPHEMERAL,
        nonce_book=book,
        now=NOW,
        allowlist={GOLDEN},
        previous_clock=None,
    )
    assert v.clock_info.reset_count == 7
    # RSASSA-PKCS1-v1_5 is deterministic: re-signing gives the committed bytes.
    assert sign(bytes.fromhex(VECTOR["tpms_attest"])).hex() == VECTOR["tpmt_signature"]


# ------------------------------------------------------------ one change each


def test_unknown_key(case: Case) -> None:
    case.ak = None
    assert reason_of(case) == "unknown_key"


def test_flip_one_signature_byte(case: Case) -> None:
    sig = bytearray(case.signature)
    sig[-1] ^= 0x01
    case.signature = bytes(sig)
    assert reason_of(case) == "bad_signature"


def test_flip_one_quote_byte_without_resigning(case: Case) -> None:
    q = bytearray(case.quote)
    q[80] ^= 0x01  # inside clockInfo
    case.quote = bytes(q)
    assert reason_of(case) == "bad_signature"


def test_signed_by_another_key(case: Case) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    case.signature = sign(case.quote, other)
    assert reason_of(case) == "bad_signature"


def test_malformed_signature(case: Case) -> None:
    case.signature = case.signature[:-1]
    assert reason_of(case) == "bad_signature"


def test_malformed_quote_resigned(case: Case) -> None:
    case.quote = case.quote + b"\x00"
    case.signature = sign(case.quote)
    assert reason_of(case) == "malformed_quote"


def test_wrong_magic(case: Case) -> None:
    case.resign(magic=tf.TPM_GENERATED_VALUE ^ 1)
    assert reason_of(case) == "bad_magic"


def test_wrong_type(case: Case) -> None:
    case.resign(type=tf.TPM_ST_ATTEST_CERTIFY)
    assert reason_of(case) == "bad_type"


def test_one_nonce_byte_changed(case: Case) -> None:
    other = case.book.issue(NOW)  # a genuine, fresh nonce, just not the one quoted
    case.server_nonce = case.nonce[:-1] + bytes([case.nonce[-1] ^ 1])
    assert reason_of(case) == "nonce_mismatch"
    case.server_nonce = other
    assert reason_of(case) == "nonce_mismatch"


def test_ephemeral_key_not_the_quoted_one(case: Case) -> None:
    case.resign(extra_data=at.expected_extra_data(case.nonce, EPHEMERAL + b"\x00"))
    assert reason_of(case) == "nonce_mismatch"


def test_nonce_expired(case: Case) -> None:
    case.now = NOW + at.NONCE_LIFETIME + 0.001
    assert reason_of(case) == "nonce_expired"


def test_nonce_reused(case: Case) -> None:
    case.verify()
    assert reason_of(case) == "nonce_reused"


def test_nonce_never_issued(case: Case) -> None:
    case.book = NonceBook()
    assert reason_of(case) == "nonce_reused"


def test_pcr_value_changed(case: Case) -> None:
    case.pcr_values = [PCR17[:-1] + bytes([PCR17[-1] ^ 1]), PCR18]
    assert reason_of(case) == "pcr_digest_mismatch"


def test_pcr_value_missing(case: Case) -> None:
    case.pcr_values = [PCR17]
    assert reason_of(case) == "pcr_digest_mismatch"


def test_different_selection(case: Case) -> None:
    extra = bytes(32)
    case.resign(
        pcr_select=(tf.PcrSelection.sha256([17, 18, 19]),),
        pcr_digest=tf.pcr_digest([PCR17, PCR18, extra]),
    )
    case.pcr_values = [PCR17, PCR18, extra]
    assert reason_of(case) == "pcr_selection_mismatch"


def test_requested_other_selection(case: Case) -> None:
    case.requested = (17,)
    assert reason_of(case) == "pcr_selection_mismatch"


# ---- a real TPM's agent quotes PCR 23: the selection an allowlisted measurement records

PCR23 = tf.extend(tf.EMPTY_PCR, hashlib.sha256(b"agent on a real TPM").digest())
GOLDEN23 = Measurement.of((23,), (PCR23,))


def quote_pcr23(case: Case, bank: tuple[tf.PcrSelection, ...] | None = None) -> None:
    case.resign(
        pcr_select=bank or (tf.PcrSelection.sha256([23]),), pcr_digest=tf.pcr_digest([PCR23])
    )
    case.pcr_values = [PCR23]
    case.allowlist = frozenset({GOLDEN, GOLDEN23})


def test_selection_recorded_by_the_allowlist_is_accepted(case: Case) -> None:
    quote_pcr23(case)
    case.from_allowlist = True
    assert case.verify().measurement == GOLDEN23


def test_without_selection_from_allowlist_only_the_request_counts(case: Case) -> None:
    quote_pcr23(case)
    assert reason_of(case) == "pcr_selection_mismatch"


def test_selection_no_allowlist_entry_records(case: Case) -> None:
    quote_pcr23(case)
    case.from_allowlist = True
    case.allowlist = frozenset({GOLDEN})
    assert reason_of(case) == "pcr_selection_mismatch"


@pytest.mark.parametrize(
    "bank",
    [
        (tf.PcrSelection(0x0004, (23,)),),  # SHA-1 bank, same index
        (tf.PcrSelection.sha256([23]), tf.PcrSelection(0x0004, (23,))),  # two banks
    ],
)
def test_allowlisted_index_in_another_bank_is_refused(
    case: Case, bank: tuple[tf.PcrSelection, ...]
) -> None:
    quote_pcr23(case, bank)
    case.from_allowlist = True
    assert reason_of(case) == "pcr_selection_mismatch"


def test_allowlisted_selection_with_other_values(case: Case) -> None:
    other = tf.extend(tf.EMPTY_PCR, hashlib.sha256(b"patched").digest())
    quote_pcr23(case)
    case.resign(pcr_digest=tf.pcr_digest([other]))
    case.pcr_values = [other]
    case.from_allowlist = True
    assert reason_of(case) == "measurement_not_allowed"


def test_measurement_not_allowed(case: Case) -> None:
    modified = tf.extend(tf.EMPTY_PCR, hashlib.sha256(b"a modified agent").digest())
    case.resign(pcr_digest=tf.pcr_digest([modified, PCR18]))
    case.pcr_values = [modified, PCR18]
    assert reason_of(case) == "measurement_not_allowed"


def test_empty_allowlist(case: Case) -> None:
    case.allowlist = frozenset()
    assert reason_of(case) == "measurement_not_allowed"


def test_clock_regressed(case: Case) -> None:
    case.previous_clock = tf.ClockInfo(50_001, 3, 0, True)
    assert reason_of(case) == "clock_regressed"


def test_reset_count_regressed(case: Case) -> None:
    case.previous_clock = tf.ClockInfo(1, 4, 0, True)
    assert reason_of(case) == "reset_count_regressed"


def test_restart_count_regressed(case: Case) -> None:
    case.previous_clock = tf.ClockInfo(1, 3, 1, True)
    assert reason_of(case) == "reset_count_regressed"


def test_clock_may_fall_back_only_after_an_unsafe_reset(case: Case) -> None:
    case.previous_clock = tf.ClockInfo(60_000, 2, 0, True)
    assert reason_of(case) == "clock_regressed"  # safe = YES forbids it
    case.server_nonce = case.book.issue(NOW)  # the failed attempt used the first nonce up
    case.resign(
        clock_info=tf.ClockInfo(50_000, 3, 0, False),
        extra_data=at.expected_extra_data(case.server_nonce, EPHEMERAL),
    )
    case.verify()


def test_clock_forward_and_later_reset_pass(case: Case) -> None:
    case.previous_clock = tf.ClockInfo(49_999, 2, 7, True)
    assert case.verify().clock_info.clock == 50_000


# ------------------------------------------------------------ ordering


def test_forgery_is_rejected_before_anything_else_and_keeps_the_nonce(case: Case) -> None:
    good_quote, good_sig = case.quote, case.signature
    forged = dataclasses.replace(case.attest, magic=0, pcr_digest=bytes(32))
    case.quote = tf.encode_attest(forged)
    assert reason_of(case) == "bad_signature"
    case.quote = good_quote[:10]
    assert reason_of(case) == "bad_signature"
    assert len(case.book) == 1  # nonce not burnt by unsigned input
    case.quote, case.signature = good_quote, good_sig
    case.verify()


def test_every_reason_is_distinct() -> None:
    assert len(set(at.REASONS)) == len(at.REASONS) == 13


# ------------------------------------------------------------ helpers


def test_extra_data_and_agent_id_definitions() -> None:
    n = bytes(range(32))
    assert at.expected_extra_data(n, b"spki") == hashlib.sha256(n + b"spki").digest()
    assert at.agent_id(b"spki") == hashlib.sha256(b"spki").digest()


def test_measurement_text_round_trip() -> None:
    text = f"sha256:17={PCR17.hex()},18={PCR18.hex()}"
    m = Measurement.parse(text)
    assert m.format() == text == str(m) == VECTOR["measurement"]
    assert Measurement.of((18, 17), (PCR18, PCR17)) == m
    assert hash(m) == hash(Measurement.parse(text + "\n"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha1:17=" + "00" * 32,
        "sha256:",
        "sha256:17=" + "00" * 31,
        "sha256:17=" + "zz" * 32,
        "sha256:x=" + "00" * 32,
        "sha256:18={0},17={0}".format("00" * 32),
        "sha256:17={0},17={0}".format("00" * 32),
    ],
)
def test_measurement_parse_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        Measurement.parse(text)


def test_nonce_book_is_bounded_and_forgets_old_nonces() -> None:
    book = NonceBook(lifetime=30.0, max_outstanding=4)
    nonces = [book.issue(float(i)) for i in range(6)]
    assert len(book) == 4
    with pytest.raises(AttestationError, match="nonce_reused"):
        book.consume(nonces[0], 6.0)  # evicted
    book.consume(nonces[5], 6.0)
    book.issue(200.0)  # purges entries a lifetime past expiry
    assert len(book) == 1


def test_nonce_book_uses_injected_randomness() -> None:
    counter = iter(range(100))
    rb: Callable[[int], bytes] = lambda n: bytes([next(counter)]) * n  # noqa: E731
    book = NonceBook()
    assert book.issue(0.0, rb) == bytes(32)
    with pytest.raises(ValueError):
        book.issue(0.0, lambda n: b"short")
