"""Key exchange and transcript authentication for the handshake.

The server wraps a fresh AES-256 key to the agent's attested ephemeral RSA key
(RSA-OAEP, SHA-256) and signs the handshake transcript with its long-term
Ed25519 key. The agent accepts the key only if the signer is the organisation
key it pinned, so it never runs code from anyone else.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from vcomp.errors import AuthenticationFailed, CryptoError

SESSION_KEY_LEN = 32
EPHEMERAL_KEY_BITS = 2048
TRANSCRIPT_LABEL = b"vcomp/1 key\x00"

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


def key_fingerprint(raw_public_key: bytes) -> bytes:
    """SHA-256 of a raw Ed25519 public key: what an agent pins."""
    return hashlib.sha256(raw_public_key).digest()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_ephemeral() -> tuple[rsa.RSAPrivateKey, bytes]:
    """A fresh RSA-2048 key and its SubjectPublicKeyInfo DER."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=EPHEMERAL_KEY_BITS)
    return key, spki_der(key)


def spki_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def wrap_session_key(ephemeral_spki: bytes, session_key: bytes) -> bytes:
    try:
        public = serialization.load_der_public_key(ephemeral_spki)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"ephemeral key is not a DER public key: {exc}") from None
    if not isinstance(public, rsa.RSAPublicKey) or public.key_size != EPHEMERAL_KEY_BITS:
        raise CryptoError("ephemeral key must be RSA-2048")
    return public.encrypt(session_key, _OAEP)


def unwrap_session_key(ephemeral: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    try:
        key = ephemeral.decrypt(wrapped, _OAEP)
    except ValueError:
        raise AuthenticationFailed("wrapped session key does not decrypt") from None
    if len(key) != SESSION_KEY_LEN:
        raise CryptoError("wrapped session key has the wrong length")
    return key


def transcript(
    *,
    hello: bytes,
    challenge: bytes,
    attest: bytes,
    session_id: int,
    wrapped: bytes,
    server_key: bytes,
    window: int,
    idle_timeout_ms: int,
) -> bytes:
    """The exact bytes the server signs (PROTOCOL.md section 7.5)."""
    h = hashlib.sha256
    return b"".join(
        (
            TRANSCRIPT_LABEL,
            h(hello).digest(),
            h(challenge).digest(),
            h(attest).digest(),
            struct.pack(">Q", session_id),
            h(wrapped).digest(),
            server_key,
            struct.pack(">HI", window, idle_timeout_ms),
        )
    )


def sign_transcript(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify_server(
    *, pinned_fingerprint: bytes, server_key: bytes, signature: bytes, message: bytes
) -> None:
    """Raise unless ``server_key`` is the pinned key and it signed ``message``."""
    if not hmac.compare_digest(key_fingerprint(server_key), pinned_fingerprint):
        raise AuthenticationFailed("server key does not match the pinned fingerprint")
    try:
        Ed25519PublicKey.from_public_bytes(server_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthenticationFailed("server signature over the handshake is invalid") from None
