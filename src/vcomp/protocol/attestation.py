"""The server's quote verifier: pure, no I/O, every rejection has its own reason string.

Check order (see protocol/spec/attestation.md): key known, quote size, signature, then
the signed contents (magic, type, structure, extraData, nonce freshness, PCR selection,
PCR digest, allowlist, clock). The signature is verified over the raw bytes before
anything inside them is trusted, so a forged quote never reaches the later checks and
can never consume a nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vcomp.errors import AttestationError, ConfigError, DecodeError
from vcomp.protocol import tpm_format as tf
from vcomp.protocol.tpm_format import ClockInfo

NONCE_SIZE = 32
NONCE_LIFETIME = 30.0  # seconds from CHALLENGE to ATTEST
MAX_OUTSTANDING_NONCES = 65536
MEASURED_PCRS = (17, 18)  # PCR 17: agent code, PCR 18: sandbox policy

# Every reason verify_quote (or NonceBook.consume) can raise, in check order.
REASONS = (
    "unknown_key",
    "malformed_quote",
    "bad_signature",
    "bad_magic",
    "bad_type",
    "nonce_mismatch",
    "nonce_expired",
    "nonce_reused",
    "pcr_selection_mismatch",
    "pcr_digest_mismatch",
    "measurement_not_allowed",
    "reset_count_regressed",
    "clock_regressed",
)


def spki_der(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def agent_id(ak_spki_der: bytes) -> bytes:
    """An agent's identity: SHA-256 of its attestation key's SubjectPublicKeyInfo DER."""
    return hashlib.sha256(ak_spki_der).digest()


def expected_extra_data(server_nonce: bytes, ephemeral_spki_der: bytes) -> bytes:
    """The quote's extraData: SHA-256(server nonce || agent's ephemeral RSA SPKI DER)."""
    return hashlib.sha256(server_nonce + ephemeral_spki_der).digest()


def ak_public_area(key: rsa.RSAPublicKey) -> bytes:
    """The TPMT_PUBLIC a TPM would hold for this RSA attestation key."""
    numbers = key.public_numbers()
    modulus = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
    return tf.encode_rsa_ak_public(modulus, numbers.e)


def ak_name(key: rsa.RSAPublicKey) -> bytes:
    """The AK's TPM Name (nameAlg || SHA-256(TPMT_PUBLIC)), used as qualifiedSigner."""
    return tf.object_name(ak_public_area(key))


@dataclass(frozen=True, slots=True)
class Measurement:
    """A golden set of PCR values (by default PCR 17 and 18 of the SHA-256 bank).

    Text form, one line: ``sha256:17=<64 hex>,18=<64 hex>``.
    """

    pcrs: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        indices = [i for i, _ in self.pcrs]
        if indices != sorted(set(indices)):
            raise ValueError("measurement PCR indices must be unique and ascending")
        if any(len(v) != tf.SHA256_SIZE for _, v in self.pcrs):
            raise ValueError("measurement values must be 32-byte SHA-256 digests")

    @classmethod
    def of(cls, indices: Sequence[int], values: Sequence[bytes]) -> Measurement:
        return cls(tuple(sorted(zip(indices, values, strict=True))))

    def format(self) -> str:
        return "sha256:" + ",".join(f"{i}={v.hex()}" for i, v in self.pcrs)

    @classmethod
    def parse(cls, text: str) -> Measurement:
        """Parse the text form; raises ConfigError on anything else."""
        bank, sep, rest = text.strip().partition(":")
        if bank != "sha256" or not sep or not rest:
            raise ConfigError(f"measurement must look like sha256:17=<hex>,18=<hex>: {text!r}")
        pairs = []
        for item in rest.split(","):
            index, eq, hexval = item.partition("=")
            if not eq or not index.isdigit() or len(hexval) != 2 * tf.SHA256_SIZE:
                raise ConfigError(f"bad measurement entry {item!r}")
            try:
                pairs.append((int(index), bytes.fromhex(hexval)))
            except ValueError:
                raise ConfigError(f"bad hex in measurement entry {item!r}") from None
        try:
            return cls(tuple(pairs))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def __str__(self) -> str:
        return self.format()


class NonceBook:
    """Server nonces for CHALLENGE: single-use, expire after ``lifetime`` seconds.

    Bounded: at most ``max_outstanding`` entries; the oldest is evicted first. Consumed
    nonces are forgotten, so a reused nonce and one never issued look the same
    ("nonce_reused"). Expired ones are kept for one more lifetime so that a late ATTEST
    is reported as "nonce_expired" rather than "nonce_reused".
    """

    def __init__(
        self, lifetime: float = NONCE_LIFETIME, max_outstanding: int = MAX_OUTSTANDING_NONCES
    ) -> None:
        self.lifetime = lifetime
        self.max_outstanding = max_outstanding
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def issue(self, now: float, random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
        self._purge(now)
        while len(self._expiry) >= self.max_outstanding:
            self._expiry.popitem(last=False)
        nonce = random_bytes(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError("random_bytes returned the wrong length")
        self._expiry[nonce] = now + self.lifetime
        return nonce

    def consume(self, nonce: bytes, now: float) -> None:
        """Accept a nonce once; raise AttestationError otherwise."""
        expiry = self._expiry.pop(nonce, None)
        if expiry is None:
            raise AttestationError("nonce_reused", "nonce unknown or already used")
        if now > expiry:
            raise AttestationError("nonce_expired", f"nonce expired {now - expiry:.3f} s ago")

    def _purge(self, now: float) -> None:
        # Issue order is expiry order while `now` does not go backwards.
        while self._expiry:
            nonce, expiry = next(iter(self._expiry.items()))
            if expiry + self.lifetime > now:
                break
            del self._expiry[nonce]


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    """What the verifier vouches for once every check has passed."""

    agent_id: bytes
    measurement: Measurement
    clock_info: ClockInfo
    firmware_version: int
    qualified_signer: bytes
    extra_data: bytes


def _verify_signature(key: rsa.RSAPublicKey, quote: bytes, signature: bytes) -> None:
    try:
        sig = tf.decode_signature(signature)
    except DecodeError as exc:
        raise AttestationError("bad_signature", f"malformed TPMT_SIGNATURE: {exc}") from None
    if sig.hash_alg != tf.TPM_ALG_SHA256:
        raise AttestationError("bad_signature", f"hash 0x{sig.hash_alg:04x} is not SHA-256")
    if len(sig.signature) != (key.key_size + 7) // 8:
        raise AttestationError("bad_signature", "signature length does not match the key")
    try:
        key.verify(sig.signature, quote, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AttestationError("bad_signature", "RSASSA-SHA256 signature invalid") from None


def _check_clock(new: ClockInfo, prev: ClockInfo) -> None:
    if new.reset_count < prev.reset_count or (
        new.reset_count == prev.reset_count and new.restart_count < prev.restart_count
    ):
        raise AttestationError(
            "reset_count_regressed",
            f"reset/restart {new.reset_count}/{new.restart_count} < "
            f"{prev.reset_count}/{prev.restart_count}",
        )
    # TPM Part 1: Clock may fall back only across a reset after an unorderly shutdown,
    # and then the TPM reports safe = NO.
    lost_time_allowed = new.reset_count > prev.reset_count and not new.safe
    if new.clock < prev.clock and not lost_time_allowed:
        raise AttestationError("clock_regressed", f"clock {new.clock} < {prev.clock}")


def _quoted_pcrs(
    quoted: tuple[tf.PcrSelection, ...],
    requested: Sequence[int],
    allowlist: Collection[Measurement] | None,
) -> tuple[int, ...]:
    """The PCR indices the quote covers: the requested ones or (``allowlist`` given)
    a selection an allowlisted measurement records."""
    wanted = (tf.PcrSelection.sha256(requested),)
    if quoted == wanted:
        return wanted[0].pcrs
    known = set() if allowlist is None else {tuple(i for i, _ in m.pcrs) for m in allowlist}
    if len(quoted) == 1 and quoted[0].hash_alg == tf.TPM_ALG_SHA256 and quoted[0].pcrs in known:
        return quoted[0].pcrs
    raise AttestationError(
        "pcr_selection_mismatch",
        f"quoted {quoted}, requested {wanted}"
        + ("" if allowlist is None else f" or an allowlisted selection {sorted(known)}"),
    )


def verify_quote(
    *,
    ak_public_key: rsa.RSAPublicKey | None,
    quote: bytes,
    signature: bytes,
    pcr_values: Sequence[bytes],
    server_nonce: bytes,
    ephemeral_spki_der: bytes,
    nonce_book: NonceBook,
    now: float,
    requested_pcrs: Sequence[int] = MEASURED_PCRS,
    selection_from_allowlist: bool = False,
    allowlist: Collection[Measurement],
    previous_clock: ClockInfo | None,
) -> VerifiedQuote:
    """Verify an agent's quote or raise AttestationError(reason, detail).

    ``ak_public_key`` is the enrolled AK looked up by the caller (None: not enrolled).
    ``server_nonce`` is the nonce this session's CHALLENGE carried; it is consumed from
    ``nonce_book`` once the quote is known to be signed and bound to it.
    ``selection_from_allowlist``: besides ``requested_pcrs``, accept any selection that an
    allowlisted measurement records (a real TPM measures into PCR 23, not 17+18).
    ``previous_clock`` is this AK's clock info from its last accepted quote; the caller
    stores ``VerifiedQuote.clock_info`` for next time.
    """
    if not isinstance(ak_public_key, rsa.RSAPublicKey):
        raise AttestationError("unknown_key", "attestation key is not enrolled")
    if len(quote) > tf.MAX_ATTEST_SIZE:
        raise AttestationError("malformed_quote", f"quote of {len(quote)} bytes is too large")
    _verify_signature(ak_public_key, quote, signature)

    try:
        magic, st = tf.decode_attest_header(quote)
    except DecodeError as exc:
        raise AttestationError("malformed_quote", str(exc)) from None
    if magic != tf.TPM_GENERATED_VALUE:
        raise AttestationError("bad_magic", f"magic 0x{magic:08x}")
    if st != tf.TPM_ST_ATTEST_QUOTE:
        raise AttestationError("bad_type", f"type 0x{st:04x}")
    try:
        attest = tf.decode_attest(quote)
    except DecodeError as exc:
        raise AttestationError("malformed_quote", str(exc)) from None

    expected = expected_extra_data(server_nonce, ephemeral_spki_der)
    if not hmac.compare_digest(attest.extra_data, expected):
        raise AttestationError("nonce_mismatch", "extraData is not H(nonce || ephemeral key)")
    nonce_book.consume(server_nonce, now)

    indices = _quoted_pcrs(
        attest.pcr_select, requested_pcrs, allowlist if selection_from_allowlist else None
    )
    if len(pcr_values) != len(indices) or any(len(v) != tf.SHA256_SIZE for v in pcr_values):
        raise AttestationError("pcr_digest_mismatch", f"expected {len(indices)} SHA-256 PCR values")
    if not hmac.compare_digest(attest.pcr_digest, tf.pcr_digest(pcr_values)):
        raise AttestationError("pcr_digest_mismatch", "reported PCR values do not match pcrDigest")

    measurement = Measurement.of(indices, pcr_values)
    if measurement not in allowlist:
        raise AttestationError("measurement_not_allowed", measurement.format())
    if previous_clock is not None:
        _check_clock(attest.clock_info, previous_clock)

    return VerifiedQuote(
        agent_id=agent_id(spki_der(ak_public_key)),
        measurement=measurement,
        clock_info=attest.clock_info,
        firmware_version=attest.firmware_version,
        qualified_signer=attest.qualified_signer,
        extra_data=attest.extra_data,
    )
