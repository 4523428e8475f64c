"""The enrolment line: how a volunteer hands the agent's attestation key to the organisation.

Format, one line of four space-separated fields (the grammar is in
protocol/spec/attestation.md section 1.1)::

    vcomp-enrol/1 <agent id, 64 hex> <name> <base64 of the AK's SubjectPublicKeyInfo DER>

The agent id is redundant (it is SHA-256 of the SPKI), which lets the parser catch a
line that was edited or mangled in transit. The admin should still compare the agent id
with the volunteer out of band: the line itself proves nothing about who sent it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.agent.tpm_backend import Tpm
from vcomp.errors import ConfigError

__all__ = ["ENROLMENT_TAG", "Enrolment", "format_enrolment", "parse_enrolment"]

ENROLMENT_TAG = "vcomp-enrol/1"
AK_BITS = 2048
AK_EXPONENT = 65537
MAX_NAME = 64
MAX_LINE = 2048  # an RSA-2048 SPKI is 294 bytes, 392 in base64
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Enrolment:
    agent_id: str  # 64 lowercase hex digits
    name: str
    ak_public_pem: str  # SubjectPublicKeyInfo PEM, as Store.enroll_agent takes it


def enrolment_name(name: str) -> str:
    """The name as it travels in the line: whitespace becomes '-', at most 64 characters."""
    cleaned = re.sub(r"\s+", "-", name.strip())[:MAX_NAME]
    if not cleaned or not cleaned.isprintable():
        raise ConfigError(f"agent name {name!r} is empty or not printable")
    return cleaned


def format_enrolment(tpm: Tpm, name: str) -> str:
    spki = base64.b64encode(tpm.ak_spki_der).decode("ascii")
    return f"{ENROLMENT_TAG} {tpm.agent_id.hex()} {enrolment_name(name)} {spki}"


def parse_enrolment(line: str) -> Enrolment:
    """Parse and check an enrolment line; raises ConfigError saying what is wrong."""
    if len(line) > MAX_LINE:
        raise ConfigError(f"enrolment line longer than {MAX_LINE} characters")
    fields = line.split()
    if not fields or fields[0] != ENROLMENT_TAG:
        raise ConfigError(f"not an enrolment line: it must start with {ENROLMENT_TAG!r}")
    if len(fields) != 4:
        raise ConfigError(
            f"an enrolment line has 4 fields ({ENROLMENT_TAG} AGENT_ID NAME KEY), "
            f"this one has {len(fields)}"
        )
    _, agent_id, name, spki_b64 = fields
    agent_id = agent_id.lower()
    if not _HEX64.fullmatch(agent_id):
        raise ConfigError("enrolment line: the agent id must be 64 hex digits")
    if len(name) > MAX_NAME or not name.isprintable():
        raise ConfigError(f"enrolment line: the name must be 1-{MAX_NAME} printable characters")
    try:
        spki = base64.b64decode(spki_b64, validate=True)
        key = serialization.load_der_public_key(spki)
    except (binascii.Error, ValueError):
        raise ConfigError("enrolment line: the key is not a base64 DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != AK_BITS:
        raise ConfigError("enrolment line: the attestation key must be RSA-2048")
    if key.public_numbers().e != AK_EXPONENT:  # a TPM's AK (TPMT_PUBLIC exponent 0)
        raise ConfigError(f"enrolment line: the attestation key's exponent must be {AK_EXPONENT}")
    # Re-encode, so a non-canonical DER cannot smuggle in a different id.
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    actual = hashlib.sha256(canonical).hexdigest()
    if canonical != spki or not hmac.compare_digest(actual, agent_id):
        raise ConfigError(
            "enrolment line: the agent id does not match the attestation key "
            "(the line was altered or mangled)"
        )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return Enrolment(agent_id=agent_id, name=name, ak_public_pem=pem)
