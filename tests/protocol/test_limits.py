"""The limits agree with each other and with the numbers PROTOCOL.md publishes."""

from __future__ import annotations

import re
from pathlib import Path

from vcomp.protocol import limits

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "PROTOCOL.md"


def test_datagram_arithmetic() -> None:
    assert limits.MAX_DATAGRAM == 1500 - 20 - 8  # Ethernet MTU minus IPv4 and UDP headers
    assert limits.MAX_BODY == limits.MAX_DATAGRAM - limits.HEADER_LEN
    assert limits.MAX_PLAINTEXT_BODY == limits.MAX_BODY - limits.AEAD_TAG_LEN
    assert limits.HEADER_LEN < limits.MIN_HELLO_DATAGRAM <= limits.MAX_DATAGRAM
    assert limits.MIN_HELLO_BODY == limits.MIN_HELLO_DATAGRAM - limits.HEADER_LEN


def test_chunks_fit() -> None:
    assert 0 < limits.DEFAULT_CHUNK <= limits.MAX_CHUNK < limits.MAX_PLAINTEXT_BODY


def test_timers_are_ordered() -> None:
    assert limits.KEEPALIVE_INTERVAL * 3 < limits.IDLE_TIMEOUT + 1e-9
    assert limits.HANDSHAKE_RETRANSMIT <= limits.HANDSHAKE_RETRANSMIT_MAX
    assert limits.HANDSHAKE_RETRANSMIT_MAX < limits.HANDSHAKE_GIVE_UP
    assert limits.COOKIE_ROTATION < limits.COOKIE_LIFETIME <= 2 * limits.COOKIE_ROTATION
    assert limits.RECONNECT_BACKOFF <= limits.RECONNECT_BACKOFF_MAX


def test_key_usage_limits() -> None:
    # Far below the AES-GCM bound for random-looking nonces; our nonces never repeat anyway.
    assert limits.SESSION_PACKET_LIMIT <= 2**23
    assert limits.FORGED_PACKET_LIMIT <= 2**20
    assert limits.REPLAY_WINDOW >= 1024


def test_spec_limits_table_matches() -> None:
    """Every `NAME` | value row of the spec's limits table equals the constant."""
    rows = re.findall(r"^\| `([A-Z_0-9]+)` \| ([^|]+) \|", SPEC.read_text(), re.MULTILINE)
    assert len(rows) >= 30
    names = {name for name in dir(limits) if name.isupper()}
    for name, value in rows:
        assert name in names, name
        expected = getattr(limits, name)
        written = value.strip().split(" ")[0].replace(",", "")
        assert float(written) == expected, (name, written, expected)
