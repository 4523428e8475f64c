"""A seeded generator of hostile datagrams for the server fuzzer.

Each call to :meth:`DatagramFuzzer.next` returns one datagram from one of the
categories below, drawn with fixed weights from a seeded :class:`random.Random`,
so a failing run can be replayed from its seed. Real packets captured from a
live session are the seed corpus for the truncation and bit-flip categories.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import fields

import msgpack

from vcomp.protocol import limits
from vcomp.protocol.messages import (
    Ack,
    Attest,
    Challenge,
    Code,
    End,
    Error,
    Hello,
    Key,
    Ready,
    Reject,
    Reset,
    Result,
    Retry,
    Start,
)
from vcomp.protocol.wire import MAGIC, VERSION, PacketType

_HEADER = struct.Struct(">HBBBBQQH")
HEADER_LEN = limits.HEADER_LEN
TYPES = [int(t) for t in PacketType]
ENCRYPTED_TYPES = [0x07, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x20, 0x21, 0x30]
PLAINTEXT_TYPES = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x30]
MESSAGE_CLASSES: list[type] = [
    Hello,
    Retry,
    Challenge,
    Attest,
    Key,
    Reject,
    Ready,
    Start,
    Code,
    End,
    Result,
    Ack,
    Reset,
    Error,
]
U64 = (1 << 64) - 1


def header(ptype: int, flags: int, session_id: int, pn: int, body_length: int) -> bytes:
    """A header with any field values at all (pack_header would refuse the absurd ones)."""
    return _HEADER.pack(MAGIC, VERSION, ptype, flags, 0, session_id, pn, body_length)


def packet(ptype: int, flags: int, session_id: int, pn: int, body: bytes) -> bytes:
    return header(ptype, flags, session_id, pn, len(body)) + body


class DatagramFuzzer:
    def __init__(self, seed: int, corpus: list[bytes], live_session: int) -> None:
        if not corpus:
            raise ValueError("the fuzzer needs captured packets to mutate")
        self.rng = random.Random(seed)
        self.corpus = corpus
        self.live_session = live_session
        self.categories: list[tuple[str, int, Callable[[], bytes]]] = [
            ("random_bytes", 22, self.random_bytes),
            ("random_after_magic", 8, self.random_after_magic),
            ("truncated_real", 12, self.truncated_real),
            ("bitflipped_real", 18, self.bitflipped_real),
            ("absurd_header", 10, self.absurd_header),
            ("unknown_session", 8, self.unknown_session),
            ("garbage_msgpack", 10, self.garbage_msgpack),
            ("garbage_hello", 4, self.garbage_hello),
            ("forged_live_session", 8, self.forged_live_session),
        ]
        self._weights = [w for _, w, _ in self.categories]

    def next(self) -> tuple[str, bytes]:
        name, _, make = self.rng.choices(self.categories, weights=self._weights)[0]
        return name, make()

    # ---- categories ----------------------------------------------------------

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, 1500))

    def random_after_magic(self) -> bytes:
        """Past the magic/version check, random everything else (mostly bad lengths)."""
        return b"VC\x03" + self.rng.randbytes(self.rng.randint(0, 1497))

    def truncated_real(self) -> bytes:
        real = self.rng.choice(self.corpus)
        return real[: self.rng.randrange(len(real))]

    def bitflipped_real(self) -> bytes:
        rng = self.rng
        data = bytearray(rng.choice(self.corpus))
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.2:  # and sometimes a whole byte replaced
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def absurd_header(self) -> bytes:
        rng = self.rng
        body = rng.randbytes(rng.randint(0, 1448))
        real_len = len(body)
        ptype = rng.choice((*TYPES, 0, 0x08, 0x16, 0x2F, 0x31, 0xFF))
        flags = rng.choice((0, 1, 0x02, 0x80, 0xFF, 0x03))
        sid = rng.choice((0, 1, U64, self.live_session, rng.getrandbits(64)))
        pn = rng.choice((0, U64, U64 - 1, 1 << 63, rng.getrandbits(64)))
        length = rng.choice((0, 0xFFFF, real_len + 1, max(real_len - 1, 0), 1448, 1449))
        head = bytearray(header(ptype, flags, sid, pn, length))
        roll = rng.random()
        if roll < 0.15:
            head[5] = rng.randrange(1, 256)  # reserved byte
        elif roll < 0.3:
            head[2] = rng.choice((0, 2, 0xFF))  # version
        elif roll < 0.4:
            return bytes(head) + rng.randbytes(rng.randint(1449, 1476))  # oversize
        return bytes(head) + body

    def unknown_session(self) -> bytes:
        rng = self.rng
        sid = rng.getrandbits(64) | 1
        if rng.random() < 0.7:
            body = rng.randbytes(rng.randint(16, 1448))
            return packet(rng.choice(ENCRYPTED_TYPES), 1, sid, rng.getrandbits(64), body)
        return packet(PacketType.ATTEST, 0, sid, rng.randrange(8), self.garbage_body())

    def garbage_msgpack(self) -> bytes:
        """A valid header of a plaintext type, a body that is not the right map."""
        rng = self.rng
        ptype = rng.choice(PLAINTEXT_TYPES)
        sid = 0 if ptype == PacketType.HELLO else rng.choice((0, self.live_session))
        return packet(ptype, 0, sid, rng.randrange(4), self.garbage_body()[: limits.MAX_BODY])

    def garbage_hello(self) -> bytes:
        """A HELLO long enough to be decoded, whose body is wrong in some way."""
        body = self.garbage_body()
        short = limits.MIN_HELLO_BODY - len(body)
        if short > 0:
            body += self.rng.randbytes(short + self.rng.randrange(64))
        return packet(PacketType.HELLO, 0, 0, 0, body[: limits.MAX_BODY])

    def forged_live_session(self) -> bytes:
        """ENCRYPTED flag, the live session's id, a random body: must fail the AEAD."""
        rng = self.rng
        body = rng.randbytes(rng.randint(0, 1448))
        pn = rng.choice((rng.randrange(64), rng.randrange(1 << 20), rng.getrandbits(64)))
        return packet(rng.choice(ENCRYPTED_TYPES), 1, self.live_session, pn, body)

    # ---- bodies --------------------------------------------------------------

    def garbage_body(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return self._confused_fields()
        if roll < 0.55:
            return _pack(self._value(3))
        if roll < 0.75:
            return self._lying_prefix()
        if roll < 0.85:
            return bytes([0x91]) * rng.randint(100, 1400)  # arrays nested very deep
        return rng.randbytes(rng.randint(0, 1448))

    def _confused_fields(self) -> bytes:
        """A real message's field names with values of the wrong type or size."""
        rng = self.rng
        cls = rng.choice(MESSAGE_CLASSES)
        names = [f.name for f in fields(cls)]
        obj: dict[object, object] = {n: self._value(2) for n in names if rng.random() < 0.85}
        if rng.random() < 0.2:
            obj[rng.choice(("extra", "", "seq\x00", "é"))] = self._value(1)
        if rng.random() < 0.1:
            obj[rng.randrange(-5, 5)] = 1  # non-str key
        return _pack(obj)

    def _lying_prefix(self) -> bytes:
        """Containers and strings whose length prefix promises far more than follows."""
        rng = self.rng
        tag = rng.choice((b"\xc6", b"\xdb", b"\xdd", b"\xdf", b"\xc9"))  # bin32 str32 arr32...
        claim = rng.choice((0xFFFFFFFF, 1 << 31, 1 << 20, 70000))
        prefix = tag + claim.to_bytes(4, "big")
        if rng.random() < 0.5:
            prefix = b"\x81\xa4pad_" + prefix  # inside a one-entry map
        return prefix + rng.randbytes(rng.randint(0, 64))

    def _value(self, depth: int) -> object:
        rng = self.rng
        kind = rng.randrange(12 if depth > 0 else 9)
        if kind == 0:
            return rng.choice((0, -1, 1 << 63, U64, -(1 << 63), rng.getrandbits(32)))
        if kind == 1:
            return rng.random() * rng.choice((1, 1e300, -1e-300))
        if kind == 2:
            return None
        if kind == 3:
            return rng.random() < 0.5
        if kind == 4:
            return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
        if kind in (5, 6):
            return rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64, 65, 300, 700)))
        if kind == 7:
            return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(20)))
        if kind == 8:
            return rng.randrange(-32, 256)
        if kind in (9, 10):
            return [self._value(depth - 1) for _ in range(rng.randrange(30))]
        return {f"k{i}": self._value(depth - 1) for i in range(rng.randrange(20))}


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True, strict_types=False)
    return packed
