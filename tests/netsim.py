"""A deterministic, seeded in-memory network for protocol tests.

Two endpoints exchange datagrams over two independent one-way links. Each link
can lose, duplicate, reorder (extra random delay), corrupt (flip bits and still
deliver) and delay datagrams, all drawn from a seeded RNG, so a run is exactly
repeatable. Time is virtual: :meth:`Network.run` jumps straight to the next
delivery or endpoint timer, so a transfer that takes minutes of simulated
retransmission timeouts runs in milliseconds.

Any object with the four methods of :class:`Endpoint` can be plugged in, from
the bare reliability engine (:class:`StreamEndpoint` below, with a tiny
checksummed framing) to full protocol sessions.
"""

from __future__ import annotations

import heapq
import random
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vcomp.protocol.reliability import ReliableReceiver, ReliableSender


class Endpoint(Protocol):
    """What the simulator needs from a participant (aioquic-style, sans-I/O)."""

    def receive(self, datagram: bytes, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[bytes]: ...

    def timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Impairments of one direction. Probabilities are per datagram."""

    delay: float = 0.005
    jitter: float = 0.0  # uniform extra delay in [0, jitter); keeps the order
    loss: float = 0.0
    duplicate: float = 0.0  # the copy gets its own delay
    reorder: float = 0.0  # probability of an extra uniform delay in [0, reorder_delay)
    reorder_delay: float = 0.02
    corrupt: float = 0.0  # 1 to 3 random bit flips, delivered anyway

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder", "corrupt"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a probability")
        if self.delay < 0 or self.jitter < 0 or self.reorder_delay < 0:
            raise ValueError("delays must not be negative")


@dataclass(slots=True)
class LinkStats:
    sent: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    delivered: int = 0


class SimulationStalled(AssertionError):
    """The network went quiet, or hit its time or step limit, before the goal."""


A_TO_B = 0
B_TO_A = 1

Tamper = Callable[[int, bytes], bytes | None]
"""Optional on-path attacker: (direction, datagram) -> datagram to deliver, or None to drop."""


class _Link:
    def __init__(self, config: LinkConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.stats = LinkStats()
        self._fifo_at = 0.0

    def transmit(self, datagram: bytes, now: float) -> list[tuple[float, bytes]]:
        """The (arrival time, bytes) pairs this datagram turns into."""
        cfg, rng = self.config, self.rng
        self.stats.sent += 1
        if cfg.loss and rng.random() < cfg.loss:
            self.stats.lost += 1
            return []
        copies = 1
        if cfg.duplicate and rng.random() < cfg.duplicate:
            self.stats.duplicated += 1
            copies = 2
        out = []
        for _ in range(copies):
            at = now + cfg.delay
            if cfg.jitter:
                # Jitter varies the delay but keeps the link FIFO (a burst sent at
                # one instant would otherwise arrive shuffled); reordering is
                # the separate ``reorder`` knob.
                at = max(at + rng.random() * cfg.jitter, self._fifo_at)
            self._fifo_at = at
            if cfg.reorder and rng.random() < cfg.reorder:
                self.stats.reordered += 1
                at += rng.random() * cfg.reorder_delay
            data = datagram
            if cfg.corrupt and data and rng.random() < cfg.corrupt:
                self.stats.corrupted += 1
                data = self._flip_bits(data)
            out.append((at, data))
        return out

    def _flip_bits(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            bit = self.rng.randrange(len(buf) * 8)
            buf[bit >> 3] ^= 1 << (bit & 7)
        return bytes(buf)


class Network:
    """Two endpoints, two seeded links and a virtual clock."""

    def __init__(
        self,
        a: Endpoint,
        b: Endpoint,
        *,
        a_to_b: LinkConfig | None = None,
        b_to_a: LinkConfig | None = None,
        seed: int = 0,
        start: float = 0.0,
        tamper: Tamper | None = None,
    ) -> None:
        forward = a_to_b if a_to_b is not None else LinkConfig()
        self.endpoints: tuple[Endpoint, Endpoint] = (a, b)
        # One RNG per direction: traffic in one direction cannot shift the other's draws.
        self._links = (
            _Link(forward, random.Random(f"{seed}/a->b")),
            _Link(b_to_a if b_to_a is not None else forward, random.Random(f"{seed}/b->a")),
        )
        self.now = start
        self.tamper = tamper
        self._in_transit: list[tuple[float, int, int, bytes]] = []  # (at, order, dst, data)
        self._order = 0
        self.steps = 0

    @property
    def stats_a_to_b(self) -> LinkStats:
        return self._links[A_TO_B].stats

    @property
    def stats_b_to_a(self) -> LinkStats:
        return self._links[B_TO_A].stats

    def inject(self, direction: int, datagram: bytes, delay: float = 0.0) -> None:
        """Deliver ``datagram`` in ``direction`` after ``delay``, bypassing impairments."""
        self._schedule(self.now + delay, 1 - direction, datagram)

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        timeout: float = 3600.0,
        max_steps: int = 1_000_000,
    ) -> None:
        """Advance until ``until()`` holds.

        Without ``until``, run until nothing is left to happen or ``timeout``
        virtual seconds have passed, whichever is first. With it, raise
        SimulationStalled if the goal is not met by then. Both raise it after
        ``max_steps`` events (an endpoint whose timer never moves forward).
        Exceptions from endpoints propagate unchanged.
        """
        limit = self.now + timeout
        for _ in range(max_steps):
            self._collect()
            if until is not None and until():
                return
            at = self._next_event()
            if at is None:
                if until is None:
                    return
                raise SimulationStalled(f"network idle at t={self.now:.3f} s, goal not met")
            if at > limit:
                if until is None:
                    self.now = limit
                    return
                raise SimulationStalled(f"goal not met within {timeout} virtual seconds")
            self.now = max(self.now, at)
            self.steps += 1
            self._deliver_due()
            for endpoint in self.endpoints:
                deadline = endpoint.timer()
                if deadline is not None and deadline <= self.now:
                    endpoint.handle_timer(self.now)
        raise SimulationStalled(f"no result after {max_steps} steps (t={self.now:.3f} s)")

    def _collect(self) -> None:
        for src, endpoint in enumerate(self.endpoints):
            for datagram in endpoint.datagrams_to_send(self.now):
                if self.tamper is not None:
                    tampered = self.tamper(src, datagram)
                    if tampered is None:
                        continue
                    datagram = tampered
                for at, data in self._links[src].transmit(datagram, self.now):
                    self._schedule(at, 1 - src, data)

    def _schedule(self, at: float, dst: int, data: bytes) -> None:
        self._order += 1
        heapq.heappush(self._in_transit, (at, self._order, dst, data))

    def _next_event(self) -> float | None:
        candidates = [e.timer() for e in self.endpoints]
        if self._in_transit:
            candidates.append(self._in_transit[0][0])
        times = [t for t in candidates if t is not None]
        return min(times) if times else None

    def _deliver_due(self) -> None:
        queue = self._in_transit
        while queue and queue[0][0] <= self.now:
            _, _, dst, data = heapq.heappop(queue)
            self._links[1 - dst].stats.delivered += 1
            self.endpoints[dst].receive(data, self.now)


# ---- a tiny framing to drive the bare reliability engine ------------------------
#
# crc32 (u32, over the rest) | kind (u8) | packet number (u64) | body
#   DATA body: seq (u64) | payload
#   ACK  body: ack delay in µs (u32) | range count (u16) | count x (lo u64, hi u64)
# The checksum stands in for the AEAD tag: a corrupted datagram is dropped.

_HEAD = struct.Struct(">IBQ")
_SEQ = struct.Struct(">Q")
_ACK = struct.Struct(">IH")
_RANGE = struct.Struct(">QQ")
KIND_DATA = 1
KIND_ACK = 2


@dataclass(frozen=True, slots=True)
class DataFrame:
    packet_number: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class AckFrame:
    packet_number: int
    ranges: tuple[tuple[int, int], ...]
    ack_delay: float


def _seal(kind: int, packet_number: int, body: bytes) -> bytes:
    rest = _HEAD.pack(0, kind, packet_number)[4:] + body
    return struct.pack(">I", zlib.crc32(rest)) + rest


def encode_data(packet_number: int, seq: int, payload: bytes) -> bytes:
    return _seal(KIND_DATA, packet_number, _SEQ.pack(seq) + payload)


def encode_ack(packet_number: int, ranges: Sequence[tuple[int, int]], ack_delay: float) -> bytes:
    delay_us = min(max(int(ack_delay * 1e6), 0), 0xFFFFFFFF)
    body = _ACK.pack(delay_us, len(ranges)) + b"".join(_RANGE.pack(lo, hi) for lo, hi in ranges)
    return _seal(KIND_ACK, packet_number, body)


def decode_frame(datagram: bytes) -> DataFrame | AckFrame | None:
    """The frame, or None for anything corrupted or malformed."""
    if len(datagram) < _HEAD.size:
        return None
    crc, kind, pn = _HEAD.unpack_from(datagram)
    if zlib.crc32(datagram[4:]) != crc:
        return None
    body = datagram[_HEAD.size :]
    if kind == KIND_DATA and len(body) >= _SEQ.size:
        return DataFrame(pn, _SEQ.unpack_from(body)[0], body[_SEQ.size :])
    if kind == KIND_ACK and len(body) >= _ACK.size:
        delay_us, count = _ACK.unpack_from(body)
        if len(body) != _ACK.size + count * _RANGE.size:
            return None
        ranges = tuple(_RANGE.unpack_from(body, _ACK.size + i * _RANGE.size) for i in range(count))
        return AckFrame(pn, ranges, delay_us / 1e6)
    return None


class StreamEndpoint:
    """One side of a byte transfer driven only by the reliability engine."""

    def __init__(
        self,
        sender: ReliableSender[bytes] | None = None,
        receiver: ReliableReceiver[bytes] | None = None,
    ) -> None:
        self.sender: ReliableSender[bytes] = sender if sender is not None else ReliableSender()
        self.receiver: ReliableReceiver[bytes] = (
            receiver if receiver is not None else ReliableReceiver()
        )
        self.received = bytearray()
        self.dropped_corrupt = 0
        self.acks_sent = 0
        self._outgoing: deque[bytes] = deque()
        self._next_pn = 0

    def write(self, data: bytes, chunk: int = 1200) -> None:
        self._outgoing.extend(data[i : i + chunk] for i in range(0, len(data), chunk))

    @property
    def done_sending(self) -> bool:
        return not self._outgoing and self.sender.idle

    def _take_pn(self) -> int:
        pn = self._next_pn
        self._next_pn = pn + 1
        return pn

    def receive(self, datagram: bytes, now: float) -> None:
        frame = decode_frame(datagram)
        if frame is None:
            self.dropped_corrupt += 1
            return
        if isinstance(frame, DataFrame):
            self.receiver.on_packet(frame.packet_number, frame.seq, frame.payload, now)
            for item in self.receiver.pop():
                self.received += item
        else:
            self.receiver.on_packet(frame.packet_number, None, None, now, ack_eliciting=False)
            self.sender.on_ack(frame.ranges, frame.ack_delay, now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out: list[bytes] = []
        while self._outgoing and self.sender.queue_space:
            self.sender.push(self._outgoing.popleft())
        if self.receiver.should_ack_now(now):
            ranges, delay = self.receiver.build_ack(now)
            if ranges:
                out.append(encode_ack(self._take_pn(), ranges, delay))
                self.acks_sent += 1
        while (nxt := self.sender.next_to_send(now)) is not None:
            seq, payload = nxt
            pn = self._take_pn()
            out.append(encode_data(pn, seq, payload))
            self.sender.on_sent(seq, pn, now)
        return out

    def timer(self) -> float | None:
        times = [t for t in (self.sender.timer(), self.receiver.ack_deadline()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        deadline = self.sender.timer()
        if deadline is not None and now >= deadline:
            self.sender.on_timeout(now)
