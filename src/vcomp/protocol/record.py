"""Record protection: AES-256-GCM over one session key (spec: protocol/spec/record.md).

The nonce is the direction (u32) followed by the packet number (u64), so a nonce
repeats only if a packet number repeats in one direction; :meth:`RecordKey.seal`
refuses that. The 24-byte packet header is the associated data. This module never
parses the header: callers pass its bytes and the packet number they put in it.
:meth:`RecordKey.seal_train` and :meth:`RecordKey.open_train` do the same for a train
of packets per call (one flush, one coalesced read), with the checks made once.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vcomp.errors import AuthenticationFailed, CryptoError, KeyExhausted

KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
AAD_LEN: Final = 24  # the wire header; duplicated here so this module stands alone
PACKET_NUMBER_MAX: Final = 2**64 - 1

# RFC 9001 §6.6 confidentiality limit for AES-GCM; see record.md "Usage limits".
DEFAULT_PACKET_LIMIT: Final = 2**23
# Far below RFC 9001's AES-GCM integrity limit (2^52); reaching it means an attack.
DEFAULT_FORGERY_LIMIT: Final = 2**20


class Direction(IntEnum):
    """Who sealed a packet; the first four bytes of its nonce."""

    SERVER_TO_AGENT = 1
    AGENT_TO_SERVER = 2

    @property
    def reverse(self) -> Direction:
        if self is Direction.SERVER_TO_AGENT:
            return Direction.AGENT_TO_SERVER
        return Direction.SERVER_TO_AGENT


class PacketNumberReused(CryptoError):
    """seal() was asked for a packet number not above the last one sealed."""


def nonce_for(direction: Direction, packet_number: int) -> bytes:
    """The 12-byte GCM nonce: u32 BE direction || u64 BE packet number."""
    if not 0 <= packet_number <= PACKET_NUMBER_MAX:
        raise CryptoError(f"packet number out of range: {packet_number}")
    return ((int(direction) << 64) | packet_number).to_bytes(NONCE_LEN, "big")


class RecordKey:
    """One session key, used to seal in one direction and open in the other.

    Each limit retires only the operation it protects: after ``packet_limit``
    seals, :meth:`seal` raises :class:`KeyExhausted`; after ``forgery_limit``
    failed opens, :meth:`open` does. Either way :attr:`exhausted` turns true and
    the session must end (the agent then re-handshakes for a fresh key).
    """

    __slots__ = (
        "_aead",
        "_forgeries",
        "_forgery_limit",
        "_next_packet_number",
        "_open_base",
        "_packet_limit",
        "_packets_sealed",
        "_send",
        "_send_base",
    )

    def __init__(
        self,
        key: bytes,
        *,
        send: Direction,
        packet_limit: int = DEFAULT_PACKET_LIMIT,
        forgery_limit: int = DEFAULT_FORGERY_LIMIT,
    ) -> None:
        if len(key) != KEY_LEN:
            # Never echo the key; its length is all the caller needs.
            raise CryptoError(f"session key must be {KEY_LEN} bytes, got {len(key)}")
        if packet_limit < 1 or forgery_limit < 1:
            raise CryptoError("usage limits must be at least 1")
        send = Direction(send)
        # AESGCM copies the key into its own context; we keep no reference to it.
        self._aead: AESGCM | None = AESGCM(key)
        self._send = send
        # The nonce read as a 96-bit integer is direction * 2^64 + packet number.
        self._send_base = int(send) << 64
        self._open_base = int(send.reverse) << 64
        self._packet_limit = packet_limit
        self._forgery_limit = forgery_limit
        self._packets_sealed = 0
        self._forgeries = 0
        self._next_packet_number = 0  # the smallest number seal() still accepts

    def __repr__(self) -> str:
        state = "wiped" if self._aead is None else "live"
        return (
            f"RecordKey(send={self._send.name}, {state}, "
            f"packets_sealed={self._packets_sealed}, forgeries={self._forgeries})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("RecordKey holds a secret and cannot be pickled or copied")

    @property
    def send_direction(self) -> Direction:
        return self._send

    @property
    def packet_limit(self) -> int:
        return self._packet_limit

    @property
    def forgery_limit(self) -> int:
        return self._forgery_limit

    @property
    def packets_sealed(self) -> int:
        return self._packets_sealed

    @property
    def forgeries(self) -> int:
        """Packets that reached decryption and failed authentication."""
        return self._forgeries

    @property
    def exhausted(self) -> bool:
        """True once either usage limit was reached; the session must end."""
        return self._packets_sealed >= self._packet_limit or self._forgeries >= self._forgery_limit

    def seal(self, header: bytes, packet_number: int, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext``; return ciphertext || 16-byte tag.

        ``header`` is the packet's 24-byte header (the AAD) and must already carry
        ``packet_number`` and the body length ``len(plaintext) + 16``.
        """
        aead = self._aead
        if (
            aead is None
            or len(header) != AAD_LEN
            or not self._next_packet_number <= packet_number <= PACKET_NUMBER_MAX
            or self._packets_sealed >= self._packet_limit
        ):
            raise self._seal_refusal(header, packet_number)
        # Claim the number before encrypting, so no failure path can hand it out twice.
        self._next_packet_number = packet_number + 1
        self._packets_sealed += 1
        nonce = (self._send_base + packet_number).to_bytes(NONCE_LEN, "big")
        return aead.encrypt(nonce, plaintext, header)

    def seal_train(self, packets: Sequence[tuple[bytes, int, bytes]]) -> list[bytes]:
        """Seal a train of ``(header, packet number, plaintext)``; return whole datagrams.

        The same packets as :meth:`seal` one by one (``header + seal(...)`` each), with
        the checks made once per train: the packet numbers must rise strictly from
        the next one :meth:`seal` accepts. A refused train seals nothing.
        """
        aead = self._aead
        count = len(packets)
        if not count:
            return []
        first, last = packets[0][1], packets[-1][1]
        if (
            aead is None
            or not self._next_packet_number <= first <= last <= PACKET_NUMBER_MAX
            or self._packets_sealed + count > self._packet_limit
        ):
            # Name the failure as seal() would for the first packet it would refuse.
            raise self._train_refusal(packets)
        previous = first - 1
        for header, packet_number, _ in packets:
            if packet_number <= previous or len(header) != AAD_LEN:
                raise self._train_refusal(packets)
            previous = packet_number
        # Claim the numbers before encrypting, as seal() does.
        self._next_packet_number = last + 1
        self._packets_sealed += count
        encrypt, base = aead.encrypt, self._send_base
        return [
            header + encrypt((base + pn).to_bytes(NONCE_LEN, "big"), plaintext, header)
            for header, pn, plaintext in packets
        ]

    def _train_refusal(self, packets: Sequence[tuple[bytes, int, bytes]]) -> CryptoError:
        """Why seal_train() refused: what seal() says of the first packet it would refuse."""
        if self._aead is None:
            return CryptoError("record key was wiped")
        expected, sealed = self._next_packet_number, self._packets_sealed
        for header, packet_number, _ in packets:
            if len(header) != AAD_LEN:
                return CryptoError(f"header must be {AAD_LEN} bytes, got {len(header)}")
            if packet_number < expected:
                return PacketNumberReused(
                    f"packet number {packet_number} is not above the last one sealed "
                    f"({expected - 1})"
                )
            if packet_number > PACKET_NUMBER_MAX:
                return CryptoError(f"packet number out of range: {packet_number}")
            if sealed >= self._packet_limit:
                break
            expected, sealed = packet_number + 1, sealed + 1
        return KeyExhausted(f"{self._packet_limit} packets were sealed under this key")

    def _seal_refusal(self, header: bytes, packet_number: int) -> CryptoError:
        """Say why seal() refused (kept off the fast path)."""
        if self._aead is None:
            return CryptoError("record key was wiped")
        if len(header) != AAD_LEN:
            return CryptoError(f"header must be {AAD_LEN} bytes, got {len(header)}")
        if packet_number < self._next_packet_number:
            return PacketNumberReused(
                f"packet number {packet_number} is not above the last one sealed "
                f"({self._next_packet_number - 1})"
            )
        if packet_number > PACKET_NUMBER_MAX:
            return CryptoError(f"packet number out of range: {packet_number}")
        return KeyExhausted(f"{self._packet_limit} packets were sealed under this key")

    def open(self, header: bytes, packet_number: int, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt a packet sealed by the peer; return the plaintext.

        Raises :class:`AuthenticationFailed` for a bad tag (counted as a forgery) and
        :class:`KeyExhausted` once ``forgery_limit`` forgeries were seen. A body too
        short to hold a tag also raises :class:`AuthenticationFailed` but is not
        counted: it never reached the cipher.
        """
        aead = self._aead
        if (
            aead is None
            or self._forgeries >= self._forgery_limit
            or len(header) != AAD_LEN
            or len(ciphertext) < TAG_LEN
            or not 0 <= packet_number <= PACKET_NUMBER_MAX
        ):
            raise self._open_refusal(header, packet_number, ciphertext)
        nonce = (self._open_base + packet_number).to_bytes(NONCE_LEN, "big")
        try:
            return aead.decrypt(nonce, ciphertext, header)
        except InvalidTag:
            self._forgeries += 1
            if self._forgeries >= self._forgery_limit:
                raise KeyExhausted(f"{self._forgery_limit} forged packets under this key") from None
            raise AuthenticationFailed("packet failed authentication") from None

    def open_train(self, packets: Sequence[tuple[bytes, int]]) -> list[bytes | None]:
        """Open a train of ``(datagram, packet number)``: the plaintext of each, or None.

        Each datagram is the 24-byte header followed by ciphertext || tag, as
        :meth:`seal_train` returns them. A datagram that fails authentication (or
        is too short to hold a header and a tag) is None, dropped alone; forgeries
        count as in :meth:`open`, which raises :class:`KeyExhausted` at the limit.
        """
        aead = self._aead
        out: list[bytes | None] = []
        if aead is None:
            raise CryptoError("record key was wiped")
        decrypt, base = aead.decrypt, self._open_base
        if self._forgeries >= self._forgery_limit:
            raise KeyExhausted(f"{self._forgery_limit} forged packets under this key")
        for datagram, packet_number in packets:
            if len(datagram) < AAD_LEN + TAG_LEN or not 0 <= packet_number <= PACKET_NUMBER_MAX:
                out.append(None)  # never reached the cipher: not a forgery
                continue
            nonce = (base + packet_number).to_bytes(NONCE_LEN, "big")
            try:
                out.append(decrypt(nonce, datagram[AAD_LEN:], datagram[:AAD_LEN]))
            except InvalidTag:
                self._forgeries += 1
                if self._forgeries >= self._forgery_limit:
                    raise KeyExhausted(
                        f"{self._forgery_limit} forged packets under this key"
                    ) from None
                out.append(None)
        return out

    def _open_refusal(self, header: bytes, packet_number: int, ciphertext: bytes) -> CryptoError:
        """Say why open() refused before decrypting (kept off the fast path)."""
        if self._aead is None:
            return CryptoError("record key was wiped")
        if self._forgeries >= self._forgery_limit:
            return KeyExhausted(f"{self._forgery_limit} forged packets under this key")
        if len(header) != AAD_LEN:
            return CryptoError(f"header must be {AAD_LEN} bytes, got {len(header)}")
        if len(ciphertext) < TAG_LEN:
            return AuthenticationFailed(f"body of {len(ciphertext)} bytes is shorter than a tag")
        return CryptoError(f"packet number out of range: {packet_number}")

    def wipe(self) -> None:
        """Drop the cipher context; later seal/open raise :class:`CryptoError`.

        Best effort: Python cannot scrub the caller's copy of the key bytes or
        memory the allocator already reused. OpenSSL frees its context when the
        last reference goes.
        """
        self._aead = None
