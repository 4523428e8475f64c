"""Every numeric bound of the vcomp/1 wire protocol, in one place.

PROTOCOL.md ("Limits") lists the same numbers; the codec, the record layer and
the session machines import them from here so the spec and the code cannot
drift apart. Sizes are in bytes, times in seconds unless the name says otherwise.
"""

from __future__ import annotations

from typing import Final

# ---- datagrams and header -----------------------------------------------------
MAX_DATAGRAM: Final = 1472
"""Largest datagram either side sends or accepts (1500-byte MTU minus IPv4 + UDP)."""
HEADER_LEN: Final = 24
MAX_BODY: Final = MAX_DATAGRAM - HEADER_LEN
"""Largest body on the wire (ciphertext + tag for encrypted packets)."""
AEAD_TAG_LEN: Final = 16
MAX_PLAINTEXT_BODY: Final = MAX_BODY - AEAD_TAG_LEN
"""Largest msgpack body of a packet that travels encrypted."""
MIN_HELLO_DATAGRAM: Final = 1200
"""A HELLO datagram shorter than this is dropped (anti-amplification)."""
MIN_HELLO_BODY: Final = MIN_HELLO_DATAGRAM - HEADER_LEN
MAX_BODY_KEYS: Final = 20
"""No body schema has more keys than this; the decoder refuses larger maps."""

# ---- job transfer -------------------------------------------------------------
DEFAULT_CHUNK: Final = 1200
"""CODE/RESULT payload bytes per packet that senders use by default."""
MAX_CHUNK: Final = 1280
MIB: Final = 1 << 20
MAX_CODE_SIZE: Final = 256 * MIB
MAX_INPUT_SIZE: Final = 256 * MIB
MAX_RESULT_SIZE: Final = 64 * MIB
MAX_CHECKPOINT_SIZE: Final = 64 * MIB
"""Largest checkpoint a START may offer to take or to resume from."""

# ---- field bounds -------------------------------------------------------------
MAX_VERSIONS: Final = 8
DIGEST_LEN: Final = 32
"""SHA-256 digests, nonces, agent ids and PCR values."""
NONCE_LEN: Final = 32
MAX_COOKIE: Final = 64
MAX_ACK_RANGES: Final = 64
MAX_COMMITTED: Final = 8
"""64 ranges + 8 committed entries keep the largest possible ACK inside one datagram."""
PCR_COUNT: Final = 24
"""PCR indices run 0..PCR_COUNT-1."""
MAX_PCRS: Final = 24
MAX_QUOTE: Final = 1024
MAX_SIGNATURE: Final = 1024
MAX_EPHEMERAL_SPKI: Final = 600
MAX_WRAPPED_KEY: Final = 512
SERVER_KEY_LEN: Final = 32
"""Raw Ed25519 public key."""
SERVER_SIGNATURE_LEN: Final = 64
"""Ed25519 signature."""
MIN_WINDOW: Final = 1
MAX_WINDOW: Final = 1024
MAX_TEXT: Final = 256
"""REJECT/RESET reasons, ERROR messages and RESULT details, in UTF-8 bytes."""
MAX_STATUS: Final = 32
"""RESULT status word, in UTF-8 bytes."""

# ---- timers -------------------------------------------------------------------
HANDSHAKE_RETRANSMIT: Final = 1.0
"""First handshake retransmission delay before any RTT sample; doubles on every retry."""
HANDSHAKE_RETRANSMIT_MAX: Final = 2.0
"""Handshake retransmissions stop doubling here (each wait jittered down to half): an
agent whose datagrams were lost in a queue that has since drained connects soon."""
HANDSHAKE_GIVE_UP: Final = 30.0
"""The agent abandons a handshake that has not completed after this long."""
RECONNECT_BACKOFF: Final = 5.0
"""Agent's first delay before a new handshake after REJECT or a lost session."""
RECONNECT_BACKOFF_MAX: Final = 300.0
IDLE_TIMEOUT: Final = 60.0
"""A session with no authenticated packet for this long is closed on both sides."""
KEEPALIVE_INTERVAL: Final = 15.0
"""A side that has sent nothing for this long sends PING."""
COOKIE_LIFETIME: Final = 120.0
COOKIE_ROTATION: Final = 60.0
"""The cookie secret rotates this often; the previous secret is still accepted."""
NONCE_LIFETIME: Final = 30.0
"""A CHALLENGE nonce is single-use and expires after this long."""

# ---- record protection --------------------------------------------------------
SESSION_PACKET_LIMIT: Final = 1 << 23
"""Packets one side may seal under one session key; then the session ends."""
FORGED_PACKET_LIMIT: Final = 1 << 20
"""Failed decryptions tolerated under one session key; then the session ends."""
REPLAY_WINDOW: Final = 2048
"""Packet numbers tracked by the anti-replay window (RFC 6479 style)."""
