"""TPM 2.0 structures used by attestation, encoded as TPM 2.0 Library Part 2 specifies.

Everything is big-endian. Only the subset vcomp needs is here: TPMS_ATTEST for a quote,
TPMT_SIGNATURE for RSASSA-SHA256, TPMT_PUBLIC for an RSA-2048 attestation key (for its
Name) and the PolicyPCR policy digest used for sealing. Decoders bound every length
before reading and raise only :class:`~vcomp.errors.DecodeError`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vcomp.errors import DecodeError

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_CC_POLICY_PCR = 0x0000017F

SHA256_SIZE = 32
PCR_COUNT = 24
PCR_SELECT_SIZE = 3  # sizeofSelect for a 24-PCR bank (PCR_SELECT_MIN)
# Bounds taken from the TPM 2.0 union sizes with SHA-512 as the largest digest.
MAX_NAME_SIZE = 66  # sizeof(TPMU_NAME) = sizeof(TPMT_HA)
MAX_DATA_SIZE = 66  # TPM2B_DATA holds a TPMT_HA
MAX_DIGEST_SIZE = 64  # TPM2B_DIGEST holds a TPMU_HA
MAX_PCR_BANKS = 16  # HASH_COUNT upper bound in TPML_PCR_SELECTION
MAX_SELECT_SIZE = 4  # PCR_SELECT_MAX
MAX_RSA_SIGNATURE_SIZE = 512  # TPM2B_PUBLIC_KEY_RSA for RSA-4096
MAX_ATTEST_SIZE = 1024  # sizeof(TPMS_ATTEST) is well below this

# fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | restricted | sign
AK_OBJECT_ATTRIBUTES = 0x00050072

EMPTY_PCR = bytes(SHA256_SIZE)


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: milliseconds of TPM time plus the power-cycle counters."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank (hash algorithm) and the selected PCR indices.

    Indices are kept sorted and unique, the order in which a TPM digests them.
    """

    hash_alg: int
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        if any(not 0 <= i < PCR_SELECT_SIZE * 8 for i in self.pcrs):
            raise ValueError(f"PCR index out of range 0..{PCR_SELECT_SIZE * 8 - 1}")
        object.__setattr__(self, "pcrs", tuple(sorted(set(self.pcrs))))

    @classmethod
    def sha256(cls, pcrs: Iterable[int]) -> PcrSelection:
        return cls(TPM_ALG_SHA256, tuple(pcrs))


@dataclass(frozen=True, slots=True)
class Attest:
    """TPMS_ATTEST with the TPMS_QUOTE_INFO arm of the union (the only one vcomp uses)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True, slots=True)
class RsassaSignature:
    """TPMT_SIGNATURE with sigAlg TPM_ALG_RSASSA."""

    hash_alg: int
    signature: bytes


# ---------------------------------------------------------------- encoding


def _u16(v: int) -> bytes:
    return struct.pack(">H", v)


def _u32(v: int) -> bytes:
    return struct.pack(">I", v)


def _tpm2b(data: bytes, bound: int) -> bytes:
    if len(data) > bound:
        raise ValueError(f"TPM2B of {len(data)} bytes exceeds {bound}")
    return _u16(len(data)) + data


def encode_pcr_selection(selections: Sequence[PcrSelection]) -> bytes:
    """TPML_PCR_SELECTION: count, then per bank hash || sizeofSelect (3) || bitmap."""
    if len(selections) > MAX_PCR_BANKS:
        raise ValueError("too many PCR banks")
    out = bytearray(_u32(len(selections)))
    for sel in selections:
        bitmap = bytearray(PCR_SELECT_SIZE)
        for i in sel.pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        out += _u16(sel.hash_alg) + bytes([PCR_SELECT_SIZE]) + bitmap
    return bytes(out)


def encode_clock_info(info: ClockInfo) -> bytes:
    return struct.pack(
        ">QIIB", info.clock, info.reset_count, info.restart_count, 1 if info.safe else 0
    )


def encode_attest(attest: Attest) -> bytes:
    """Marshal a quote's TPMS_ATTEST exactly as a TPM would sign it."""
    return b"".join(
        (
            _u32(attest.magic),
            _u16(attest.type),
            _tpm2b(attest.qualified_signer, MAX_NAME_SIZE),
            _tpm2b(attest.extra_data, MAX_DATA_SIZE),
            encode_clock_info(attest.clock_info),
            struct.pack(">Q", attest.firmware_version),
            encode_pcr_selection(attest.pcr_select),
            _tpm2b(attest.pcr_digest, MAX_DIGEST_SIZE),
        )
    )


def encode_signature(sig: RsassaSignature) -> bytes:
    """TPMT_SIGNATURE: sigAlg RSASSA || hash || TPM2B_PUBLIC_KEY_RSA."""
    return _u16(TPM_ALG_RSASSA) + _u16(sig.hash_alg) + _tpm2b(sig.signature, MAX_RSA_SIGNATURE_SIZE)


# ---------------------------------------------------------------- decoding


class _Reader:
    """A cursor that refuses to read past the end (DecodeError, never IndexError)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise DecodeError(f"truncated {what}")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def tpm2b(self, bound: int, what: str) -> bytes:
        size = self.u16(what)
        if size > bound:
            raise DecodeError(f"{what} size {size} exceeds {bound}")
        return self.take(size, what)

    def finish(self, what: str) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self._pos} trailing bytes after {what}")


def _read_pcr_selection(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("TPML_PCR_SELECTION.count")
    if count > MAX_PCR_BANKS:
        raise DecodeError(f"TPML_PCR_SELECTION.count {count} exceeds {MAX_PCR_BANKS}")
    out = []
    for _ in range(count):
        hash_alg = r.u16("TPMS_PCR_SELECTION.hash")
        size = r.u8("TPMS_PCR_SELECTION.sizeofSelect")
        if size > MAX_SELECT_SIZE:
            raise DecodeError(f"sizeofSelect {size} exceeds {MAX_SELECT_SIZE}")
        bitmap = r.take(size, "TPMS_PCR_SELECTION.pcrSelect")
        if size != PCR_SELECT_SIZE:
            # A 24-PCR bank always uses 3 bytes; anything else would not re-encode the same.
            raise DecodeError(f"sizeofSelect {size} is not {PCR_SELECT_SIZE}")
        pcrs = tuple(i for i in range(size * 8) if bitmap[i // 8] & (1 << (i % 8)))
        out.append(PcrSelection(hash_alg, pcrs))
    return tuple(out)


def decode_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    r = _Reader(data)
    out = _read_pcr_selection(r)
    r.finish("TPML_PCR_SELECTION")
    return out


def decode_attest_header(data: bytes) -> tuple[int, int]:
    """Return (magic, type) without checking them; the verifier reports each separately."""
    r = _Reader(data)
    return r.u32("TPMS_ATTEST.magic"), r.u16("TPMS_ATTEST.type")


def decode_attest(data: bytes) -> Attest:
    """Parse a quote's TPMS_ATTEST. Any magic is accepted; the type must be a quote."""
    if len(data) > MAX_ATTEST_SIZE:
        raise DecodeError(f"TPMS_ATTEST of {len(data)} bytes exceeds {MAX_ATTEST_SIZE}")
    r = _Reader(data)
    magic = r.u32("TPMS_ATTEST.magic")
    st = r.u16("TPMS_ATTEST.type")
    if st != TPM_ST_ATTEST_QUOTE:
        raise DecodeError(f"TPMS_ATTEST.type 0x{st:04x} is not TPM_ST_ATTEST_QUOTE")
    signer = r.tpm2b(MAX_NAME_SIZE, "qualifiedSigner")
    extra = r.tpm2b(MAX_DATA_SIZE, "extraData")
    clock = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    if safe > 1:
        raise DecodeError(f"clockInfo.safe {safe} is not a TPMI_YES_NO")
    firmware = r.u64("firmwareVersion")
    selection = _read_pcr_selection(r)
    digest = r.tpm2b(MAX_DIGEST_SIZE, "pcrDigest")
    r.finish("TPMS_ATTEST")
    return Attest(
        magic=magic,
        type=st,
        qualified_signer=signer,
        extra_data=extra,
        clock_info=ClockInfo(clock, reset_count, restart_count, safe == 1),
        firmware_version=firmware,
        pcr_select=selection,
        pcr_digest=digest,
    )


def decode_signature(data: bytes) -> RsassaSignature:
    """Parse a TPMT_SIGNATURE; only RSASSA is accepted."""
    r = _Reader(data)
    alg = r.u16("TPMT_SIGNATURE.sigAlg")
    if alg != TPM_ALG_RSASSA:
        raise DecodeError(f"sigAlg 0x{alg:04x} is not TPM_ALG_RSASSA")
    hash_alg = r.u16("TPMS_SIGNATURE_RSA.hash")
    sig = r.tpm2b(MAX_RSA_SIGNATURE_SIZE, "TPMS_SIGNATURE_RSA.sig")
    r.finish("TPMT_SIGNATURE")
    return RsassaSignature(hash_alg, sig)


# ---------------------------------------------------------------- digests and names


def pcr_digest(values: Iterable[bytes]) -> bytes:
    """pcrDigest of a quote: SHA-256 over the selected PCR values in selection order."""
    h = hashlib.sha256()
    for v in values:
        h.update(v)
    return h.digest()


def extend(pcr: bytes, measurement: bytes) -> bytes:
    """TPM2_PCR_Extend for the SHA-256 bank: PCR' = SHA-256(PCR || measurement)."""
    return hashlib.sha256(pcr + measurement).digest()


def encode_rsa_ak_public(modulus: bytes, exponent: int = 65537) -> bytes:
    """TPMT_PUBLIC of a restricted RSA-2048 signing key (RSASSA-SHA256), as an AK is made."""
    if len(modulus) > MAX_RSA_SIGNATURE_SIZE:
        raise ValueError("modulus too large")
    return b"".join(
        (
            _u16(TPM_ALG_RSA),  # type
            _u16(TPM_ALG_SHA256),  # nameAlg
            _u32(AK_OBJECT_ATTRIBUTES),
            _u16(0),  # authPolicy: empty TPM2B_DIGEST
            _u16(TPM_ALG_NULL),  # symmetric: TPMT_SYM_DEF_OBJECT, NULL for a signing key
            _u16(TPM_ALG_RSASSA) + _u16(TPM_ALG_SHA256),  # scheme
            _u16(len(modulus) * 8),  # keyBits
            _u32(0 if exponent == 65537 else exponent),  # 0 means the default 2^16 + 1
            _tpm2b(modulus, MAX_RSA_SIGNATURE_SIZE),  # unique.rsa
        )
    )


def object_name(tpmt_public: bytes) -> bytes:
    """TPM2B_NAME payload of an object: nameAlg (SHA-256) || SHA-256(TPMT_PUBLIC)."""
    return _u16(TPM_ALG_SHA256) + hashlib.sha256(tpmt_public).digest()


def policy_pcr_digest(
    selection: Sequence[PcrSelection], pcr_values_digest: bytes, previous: bytes = EMPTY_PCR
) -> bytes:
    """TPM2_PolicyPCR update: H(policyDigest_old || TPM_CC_PolicyPCR || pcrs || pcrDigest)."""
    return hashlib.sha256(
        previous + _u32(TPM_CC_POLICY_PCR) + encode_pcr_selection(selection) + pcr_values_digest
    ).digest()
