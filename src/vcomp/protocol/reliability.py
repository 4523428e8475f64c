"""The session's one recovery mechanism: reliable delivery over datagrams (sans-I/O).

The engine knows two kinds of numbers (protocol/spec/reliability.md):

* a **sequence number** (seq) is an item's position in one direction's reliable
  stream: 0, 1, 2, ... Each item keeps its seq for its whole life.
* a **packet number** (pn) names one transmission. The session gives every
  datagram a new, larger pn, retransmissions included, so an ACK of a pn
  identifies exactly one transmission (no retransmission ambiguity).

:class:`ReliableSender` maps pns back to seqs, detects loss the QUIC way
(packet and time thresholds, RFC 9002 section 6.1), repairs a tail loss with a
probe timeout (PTO, 6.2), keeps bytes in flight within its congestion controller's
window and paces them (section 7, :mod:`vcomp.protocol.congestion`), and gives up
with :class:`~vcomp.errors.TransferFailed` after ``max_retries`` probe timeouts in
a row without an ACK of anything new. :class:`ReliableReceiver` buffers out-of-order items,
suppresses duplicates, and decides when to send an ACK of packet-number ranges.

Besides stream items the sender carries **control frames** (RESET, the committed
notices), as aioquic does: each frame sent has a delivery callback, called with
True when a packet that carried it is acknowledged and with False when the probe
timeout declares it lost (the callback re-queues it if it still matters). Frames
share the stream's packet numbers, PTO, backoff and give-up rule, so there is one
retransmission timer and one retry limit per session: :data:`MAX_PROBE_TIMEOUTS`.

Nothing here does I/O or reads a clock: ``now`` is always passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from heapq import heappop, heappush
from itertools import islice
from typing import Any, Generic, TypeVar

from vcomp.errors import LimitExceeded, TransferFailed
from vcomp.protocol.congestion import (
    MAX_DATAGRAM,
    PERSISTENT_CONGESTION_THRESHOLD,
    NewReno,
    Pacer,
)
from vcomp.protocol.ranges import RangeSet
from vcomp.protocol.rtt import RttEstimator

T = TypeVar("T")

PACKET_THRESHOLD = 3
"""A packet is lost once a packet sent this many packet numbers later is acked."""
PROBE_COUNT = 2
"""Probe packets sent when the probe timeout expires (RFC 9002, 6.2.4), until the PTO
stops doubling at its cap; from then on one (the RFC allows one or two): a flow that
keeps probing a full queue adds one packet per capped PTO, not two."""
MAX_PROBE_TIMEOUTS = 12
"""The give-up rule: probe timeouts in a row with no ACK of anything new (stream item
or control frame) after which the peer is taken to be gone, once ``give_up_after``
seconds have also passed since the last send before the first of them (the PTO
stops doubling at about a second, so a count alone would give up within seconds)."""

GIVE_UP_AFTER = 60.0
"""A session's sender gives up no sooner than this after its stall began (the old
doubling schedule reached 60 s intervals; the idle timeout is 60 s too)."""

DeliveryCallback = Callable[[Any, bool], None]
"""``callback(payload, delivered)``: True when acked, False when declared lost."""

_MISSING = object()

# Why the sender last stopped sending: only a sender stopped by the congestion
# window or the pacer is using its window (RFC 9002, 7.8).
_LIMITED_APP = 0
_LIMITED_CWND = 1
_LIMITED_PACING = 2


class _Retry:
    """Retransmission history of one seq (only kept for seqs that needed one)."""

    __slots__ = ("first_sent", "sends", "timeouts")

    def __init__(self, first_sent: float) -> None:
        self.first_sent = first_sent
        self.sends = 1
        self.timeouts = 0


class Frame:
    """A control frame handed to the sender, with its delivery callback."""

    __slots__ = ("on_delivery", "payload")

    def __init__(self, payload: Any, on_delivery: DeliveryCallback) -> None:
        self.payload = payload
        self.on_delivery = on_delivery


class ReliableSender(Generic[T]):
    """The sending half of one reliable stream.

    Drive it like this: :meth:`push` items; while :meth:`next_to_send` returns
    ``(seq, item)``, put the item in a datagram with a fresh packet number and
    call :meth:`on_sent`; feed every ACK to :meth:`on_ack`; call :meth:`on_timeout`
    when ``now >= timer()``.

    Control frames: :meth:`send_frame`; while :meth:`next_frame` returns one, send it
    in a datagram of its own and call :meth:`on_frame_sent`. Frames are small and
    rare: they bypass the flow-control window, the congestion window and the pacer
    (and are not counted in flight), as RESET and the committed notices always did.

    ``window`` bounds the span of the stream in flight: a new seq is sent only
    while ``seq < lowest unacked seq + window``. Window 1 is stop-and-wait, and
    a receiver buffering ``window`` items past its next expected seq never has
    to drop anything. That is flow control only: the congestion controller
    (``congestion``, NewReno by default) bounds the bytes in flight, and its
    pacer says when the next packet may leave (``timer`` includes that time).
    """

    __slots__ = (
        "_base",
        "_bytes_in_flight",
        "_first_sample_at",
        "_frames",
        "_largest_acked",
        "_largest_sent",
        "_limited",
        "_loss_time",
        "_n_lost",
        "_n_retransmitted",
        "_n_sent",
        "_n_timeouts",
        "_next_new",
        "_probes",
        "_pto_base",
        "_pto_count",
        "_queue",
        "_retry",
        "_rtx",
        "_rtx_set",
        "_sent",
        "_stall_since",
        "_unacked",
        "cc",
        "frame_queue",
        "give_up_after",
        "max_queue",
        "max_retries",
        "pacer",
        "rtt",
        "window",
    )

    def __init__(
        self,
        *,
        window: int = 64,
        max_retries: int = MAX_PROBE_TIMEOUTS,
        max_queue: int = 4096,
        rtt: RttEstimator | None = None,
        congestion: NewReno | None = None,
        give_up_after: float = 0.0,
    ) -> None:
        if window < 1 or max_queue < 1 or max_retries < 0 or not give_up_after >= 0:
            raise ValueError(
                "need window >= 1, max_queue >= 1, max_retries >= 0 and give_up_after >= 0"
            )
        self.window = window
        self.max_retries = max_retries
        self.give_up_after = give_up_after
        self.max_queue = max_queue
        self.rtt = rtt if rtt is not None else RttEstimator()
        self.cc = congestion if congestion is not None else NewReno()
        self.pacer = Pacer(burst=self.cc.cwnd)
        self._bytes_in_flight = 0
        self._limited = _LIMITED_APP
        self._first_sample_at: float | None = None
        self._queue: deque[T] = deque()  # pushed, never sent; _queue[0] has seq _next_new
        self._next_new = 0
        self._base = 0  # lowest seq not yet acked
        self._unacked: dict[int, T] = {}  # handed out, not acked; in seq order
        # pn -> (seq, sent at, bytes, index among our stream packets); in pn order
        self._sent: dict[int, tuple[int, float, int, int]] = {}
        self._rtx: list[int] = []  # heap of seqs to resend, lowest first
        self._rtx_set: set[int] = set()
        self._retry: dict[int, _Retry] = {}
        self._largest_sent = -1
        self._largest_acked = -1
        self._loss_time: float | None = None
        self._pto_base: float | None = None  # last stream packet sent, while any is unacked
        self._pto_count = 0  # probe timeouts since an ACK last acknowledged something new
        self._stall_since = 0.0  # the last send before the first of those timeouts
        self._probes = 0  # PTO probes that may bypass the congestion window
        self._n_sent = 0
        self._n_retransmitted = 0
        self._n_lost = 0
        self._n_timeouts = 0
        self.frame_queue: deque[Frame] = deque()  # control frames waiting to be sent
        self._frames: dict[int, tuple[Frame, float]] = {}  # pn -> (frame, sent at), in flight

    # ---- queue -----------------------------------------------------------------

    @property
    def queue_space(self) -> int:
        """How many more items :meth:`push` accepts right now."""
        return self.max_queue - len(self._queue)

    def push(self, item: T) -> int:
        """Queue ``item``; return its seq. Raises LimitExceeded if the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            raise LimitExceeded(f"send queue full ({self.max_queue} items waiting)")
        queue.append(item)
        return self._next_new + len(queue) - 1

    # ---- control frames --------------------------------------------------------

    def send_frame(self, payload: Any, on_delivery: DeliveryCallback) -> None:
        """Queue a control frame; ``on_delivery(payload, delivered)`` reports its fate."""
        self.frame_queue.append(Frame(payload, on_delivery))

    def next_frame(self) -> Frame | None:
        """The next control frame to send (taken: report it with :meth:`on_frame_sent`)."""
        return self.frame_queue.popleft() if self.frame_queue else None

    def on_frame_sent(self, frame: Frame, packet_number: int, now: float) -> None:
        if packet_number <= self._largest_sent:
            raise ValueError(f"packet number {packet_number} does not increase")
        self._largest_sent = packet_number
        self._frames[packet_number] = (frame, now)
        self._pto_base = now

    @property
    def frames_pending(self) -> int:
        """Control frames queued or in flight."""
        return len(self.frame_queue) + len(self._frames)

    def adopt_frames(self, old: ReliableSender[Any]) -> None:
        """Take over ``old``'s control frames (a RESET restarts the stream, not them)."""
        self.frame_queue.extend(old.frame_queue)
        self._frames.update(old._frames)
        if old._largest_sent > self._largest_sent:
            self._largest_sent = old._largest_sent
        if self._frames:
            self._pto_base = old._pto_base
        old.frame_queue.clear()
        old._frames.clear()

    def _ack_frames(self, ranges: Sequence[tuple[int, int]]) -> tuple[int, float]:
        """Deliver the frames ``ranges`` acknowledge; return the largest pn and its send time."""
        frames = self._frames
        largest_pn, largest_time = -1, 0.0
        for pn in [pn for pn in frames if any(lo <= pn <= hi for lo, hi in ranges)]:
            frame, sent_at = frames.pop(pn)
            if pn > largest_pn:
                largest_pn, largest_time = pn, sent_at
            frame.on_delivery(frame.payload, True)
        if largest_pn >= 0:
            self._pto_count = 0  # the peer is alive
            if not frames and not self._unacked and not self._sent:
                self._pto_base = None
        return largest_pn, largest_time

    # ---- sending ---------------------------------------------------------------

    def next_to_send(self, now: float) -> tuple[int, T] | None:
        """The next item to transmit: retransmissions first, then new items.

        The item is taken: pass its seq to :meth:`on_sent` with the packet number
        it went out under before asking again.
        """
        rtx = self._rtx
        unacked = self._unacked
        while rtx and rtx[0] not in unacked:
            self._rtx_set.discard(heappop(rtx))  # acked while it waited
        new_allowed = bool(self._queue) and self._next_new - self._base < self.window
        if self._probes and unacked:
            # A PTO probe is not held back by the window or the pacer (RFC 9002, 7.5).
            # Queued retransmissions first, then new data, else the oldest item again.
            if not rtx and not new_allowed:
                seq = next(iter(unacked))
                info = self._retry.get(seq)
                if info is None:
                    info = self._retry[seq] = _Retry(self._first_sent(seq, now))
                info.sends += 1
                self._n_retransmitted += 1
                return seq, unacked[seq]
        elif not rtx and not new_allowed:
            self._limited = _LIMITED_APP
            return None
        cc = self.cc
        if self._probes:
            pass
        elif self._bytes_in_flight + cc.max_datagram > cc.cwnd:
            self._limited = _LIMITED_CWND
            return None
        if not self.pacer.can_send(cc.max_datagram, now):
            self._limited = _LIMITED_PACING
            return None
        if rtx:
            seq = heappop(rtx)
            self._rtx_set.discard(seq)
            self._retry[seq].sends += 1
            self._n_retransmitted += 1
            return seq, unacked[seq]
        seq = self._next_new
        item = self._queue.popleft()
        self._next_new = seq + 1
        unacked[seq] = item
        return seq, item

    def on_sent(self, seq: int, packet_number: int, now: float, size: int = MAX_DATAGRAM) -> None:
        """Record that ``seq`` left in packet ``packet_number`` (``size`` bytes) at ``now``."""
        if packet_number <= self._largest_sent:
            raise ValueError(f"packet number {packet_number} does not increase")
        if not 0 <= seq < self._next_new:
            raise ValueError(f"seq {seq} was never handed out by next_to_send")
        self._largest_sent = packet_number
        self._sent[packet_number] = (seq, now, size, self._n_sent)
        self._n_sent += 1
        self._bytes_in_flight += size
        self.pacer.on_sent(size, now)
        self._pto_base = now  # RFC 9002, 6.2.1: the PTO runs from the last ack-eliciting send
        if self._probes:
            self._probes -= 1

    # ---- acknowledgements ------------------------------------------------------

    def on_ack(self, ranges: Sequence[tuple[int, int]], ack_delay: float, now: float) -> list[int]:
        """Process an ACK of inclusive packet-number ranges; return newly acked seqs.

        The peer chooses every value here: unknown, repeated, reversed or huge
        ranges only ever match packets we actually have in flight.
        """
        sent = self._sent
        largest_pn = -1
        largest_time = 0.0
        if self._frames:
            largest_pn, largest_time = self._ack_frames(ranges)
        if not sent:
            if largest_pn > self._largest_acked:
                self._largest_acked = largest_pn
                self.rtt.on_sample(now - largest_time, ack_delay)
            return []
        floor = next(iter(sent))  # oldest packet in flight
        ceiling = self._largest_sent
        unacked = self._unacked
        missing = _MISSING
        newly: list[int] = []
        cc = self.cc
        # RFC 9002, 7.8: no growth from a window the sender was not using.
        app_limited = (
            self._limited == _LIMITED_APP
            and self._bytes_in_flight + cc.max_datagram <= cc.cwnd
            and not (cc.cwnd < cc.ssthresh and 2 * self._bytes_in_flight >= cc.cwnd)
        )
        for lo, hi in ranges:
            if lo < floor:
                lo = floor
            if hi > ceiling:
                hi = ceiling
            if lo > hi:
                continue
            # Walk whichever is shorter: the range or the packets in flight.
            pns = range(lo, hi + 1) if hi - lo < len(sent) else [p for p in sent if lo <= p <= hi]
            for pn in pns:
                record = sent.pop(pn, None)
                if record is None:
                    continue
                if pn > largest_pn:
                    largest_pn = pn
                    largest_time = record[1]
                self._bytes_in_flight -= record[2]
                cc.on_acked(record[2], record[1], now, app_limited)
                seq = record[0]
                if unacked.pop(seq, missing) is not missing:
                    newly.append(seq)
        if largest_pn < 0:
            return newly
        if largest_pn > self._largest_acked:
            # Every pn is one transmission, so this sample is unambiguous (no Karn).
            self._largest_acked = largest_pn
            self.rtt.on_sample(now - largest_time, ack_delay)
            if self._first_sample_at is None:
                self._first_sample_at = now
        if newly:
            self._pto_count = 0
            if self._retry:
                for seq in newly:
                    self._retry.pop(seq, None)
            # unacked is in seq order (seqs enter it in order and never re-enter).
            self._base = next(iter(unacked)) if unacked else self._next_new
            if not unacked and not sent and not self._frames:
                self._pto_base = None  # nothing left to probe for
        # Loss detection only has work if a packet older than the largest acked
        # is still in flight, or a time-threshold deadline was pending.
        if self._loss_time is not None or (sent and next(iter(sent)) < self._largest_acked):
            self._detect_loss(now)
        self.pacer.update_rate(cc.cwnd, self.rtt.srtt)
        return newly

    def _detect_loss(self, now: float) -> None:
        """Declare lost what the packet or time threshold says (RFC 9002, 6.1)."""
        self._loss_time = None
        largest_acked = self._largest_acked
        sent = self._sent
        if largest_acked < 0 or not sent:
            return
        loss_delay = self.rtt.loss_delay()
        lost: list[int] = []
        # pns and send times both increase in insertion order, so the lost
        # packets are a prefix of it.
        for pn, (_, sent_at, _, _) in sent.items():
            if pn > largest_acked:
                break
            # The same expression decides "lost" and sets the timer, so a timer
            # firing at exactly loss_time always finds the packet lost.
            lost_at = sent_at + loss_delay
            if largest_acked - pn >= PACKET_THRESHOLD or lost_at <= now:
                lost.append(pn)
            else:
                self._loss_time = lost_at
                break
        if not lost:
            return
        records = [sent.pop(pn) for pn in lost]
        for seq, sent_at, size, _ in records:
            self._n_lost += 1
            self._bytes_in_flight -= size
            if seq in self._unacked:
                self._queue_retransmit(seq, sent_at)
        self.cc.on_congestion(records[-1][1], now)
        if self._persistent_congestion(records):
            self.cc.on_persistent_congestion()
        self.pacer.update_rate(self.cc.cwnd, self.rtt.srtt)

    def _persistent_congestion(self, lost: list[tuple[int, float, int, int]]) -> bool:
        """RFC 9002, 7.6: consecutive packets lost over more than 3 PTOs (no backoff)."""
        rtt = self.rtt
        first_sample = self._first_sample_at
        if rtt.srtt is None or first_sample is None or len(lost) < 2:
            return False
        var4 = 4.0 * rtt.rttvar
        duration = (
            rtt.srtt + (var4 if var4 > rtt.granularity else rtt.granularity) + rtt.max_ack_delay
        ) * PERSISTENT_CONGESTION_THRESHOLD
        # A run of consecutive stream packets (by send index), all lost, all sent
        # after the first RTT sample.
        run_start = lost[0]
        previous = lost[0]
        for record in lost[1:]:
            if record[3] != previous[3] + 1 or run_start[1] <= first_sample:
                run_start = record
            elif record[1] - run_start[1] > duration:
                return True
            previous = record
        return False

    def _queue_retransmit(self, seq: int, first_sent: float) -> _Retry:
        info = self._retry.get(seq)
        if info is None:
            # First retransmission: the lost packet was the seq's first transmission.
            info = self._retry[seq] = _Retry(first_sent)
        if seq not in self._rtx_set:
            self._rtx_set.add(seq)
            heappush(self._rtx, seq)
        return info

    # ---- timers ----------------------------------------------------------------

    def timer(self) -> float | None:
        """The earliest deadline (time-threshold loss, RTO, or pacing), or None."""
        deadline = self._loss_time
        if self._limited == _LIMITED_PACING:
            paced = self.pacer.next_send_time
            if paced is not None and (deadline is None or paced < deadline):
                deadline = paced
        start = self._pto_base
        if start is not None:
            pto_at = start + self.rtt.pto
            if deadline is None or pto_at < deadline:
                deadline = pto_at
        return deadline

    def on_timeout(self, now: float) -> None:
        """Handle the deadline from :meth:`timer` (calling early does nothing).

        A probe timeout (RFC 9002, 6.2) declares nothing lost and leaves the
        congestion window alone: it doubles the PTO and sends the two oldest
        unacknowledged items again as probes, past the congestion window, so
        a tail loss is repaired by the ACK they elicit. Raises TransferFailed
        when an item was probed more than ``max_retries`` times.
        """
        if self._loss_time is not None and now >= self._loss_time:
            self._detect_loss(now)
            return
        start = self._pto_base
        if start is None or now < start + self.rtt.pto:
            return
        if not self._unacked:
            # Only extra transmissions of acknowledged items are left in flight. Their
            # ACKs may never come (nothing newer elicits one), and counted in flight
            # they could fill cwnd and block the next item for good: forget them.
            self._forget_flight()
            if not self._frames:
                return
        rto = self.rtt.pto
        self.rtt.on_timeout()
        self._n_timeouts += 1
        self._pto_base = now
        if self._pto_count == 0:
            self._stall_since = start
        self._pto_count += 1
        gone = self._pto_count > self.max_retries and now - self._stall_since >= self.give_up_after
        if self._frames:
            # A control frame unacknowledged for a PTO is lost: its callback re-queues it.
            lost = list(self._frames.values())
            self._frames.clear()
            for frame, _ in lost:
                frame.on_delivery(frame.payload, False)
            if not self._unacked:
                if gone:
                    raise TransferFailed(
                        f"a control frame was not acknowledged after {self._pto_count} "
                        f"probe timeouts (last PTO {rto:.3f} s, max_retries={self.max_retries}): "
                        f"the peer is unreachable or the path drops everything"
                    )
                return
        # Two probes at a stall's first expiry (RFC 9002); one per expiry at the cap.
        count = 1 if self._pto_count > 1 and self.rtt.backoff_capped else PROBE_COUNT
        probes = list(islice(self._unacked, count))
        self._probes = count  # with one item unacked and two probes, it is sent twice
        for seq in probes:
            info = self._retry.get(seq)
            if info is None:
                info = self._queue_retransmit(seq, self._first_sent(seq, now))
            else:
                self._queue_retransmit(seq, info.first_sent)
            info.timeouts += 1
        # Give up after max_retries probe timeouts in a row with no ACK of anything
        # new (and give_up_after s): the peer is gone. (An ACK of new data proves it
        # alive and resets this.)
        if gone:
            seq = probes[0]
            info = self._retry[seq]
            raise TransferFailed(
                f"reliable stream item seq {seq} was not acknowledged after "
                f"{info.sends} transmissions over {now - info.first_sent:.3f} s "
                f"({self._pto_count} probe timeouts, last PTO {rto:.3f} s, "
                f"max_retries={self.max_retries}): the peer is unreachable or the "
                f"path drops everything"
            )

    def _forget_flight(self) -> None:
        for record in self._sent.values():
            self._bytes_in_flight -= record[2]
        self._sent.clear()
        self._loss_time = None
        self._pto_base = None

    def _first_sent(self, seq: int, now: float) -> float:
        times = [record[1] for record in self._sent.values() if record[0] == seq]
        return min(times) if times else now

    # ---- state -----------------------------------------------------------------

    @property
    def rto(self) -> float:
        """The current probe timeout, backoff included (RESET and commit notices use it)."""
        return self.rtt.pto

    @property
    def in_flight(self) -> int:
        """Packets sent and neither acknowledged nor declared lost."""
        return len(self._sent)

    @property
    def unacked(self) -> int:
        """Items handed out for sending and not yet acknowledged."""
        return len(self._unacked)

    @property
    def queued(self) -> int:
        """Items pushed and never sent."""
        return len(self._queue)

    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`push` returns."""
        return self._next_new + len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing unacknowledged."""
        return not self._queue and not self._unacked

    @property
    def stats(self) -> dict[str, float]:
        return {
            "packets_sent": self._n_sent,
            "retransmissions": self._n_retransmitted,
            "packets_acked": self._n_sent - len(self._sent) - self._n_lost,
            "items_acked": self._next_new - len(self._unacked),
            "packets_lost": self._n_lost,
            "timeouts": self._n_timeouts,
            "srtt": self.rtt.srtt if self.rtt.srtt is not None else 0.0,
            "cwnd": self.cc.cwnd,
            "bytes_in_flight": self._bytes_in_flight,
            "rto": self.rtt.pto,
        }


class ReliableReceiver(Generic[T]):
    """The receiving half of one reliable stream.

    Feed every authenticated packet of the session to :meth:`on_packet` (data or
    not: all packet numbers are acknowledged), collect in-order items with
    :meth:`pop`, and send :meth:`build_ack` whenever :meth:`should_ack_now`.

    At most ``max_buffer`` items are held (buffered out of order plus ready and
    not yet popped). An item beyond that is dropped and its packet number is
    *not* recorded, so the sender sees it unacknowledged and sends it again
    later; acknowledging it would lose it for good.
    """

    __slots__ = (
        "_buffer",
        "_deadline",
        "_expected",
        "_largest_pn",
        "_largest_time",
        "_n_delivered",
        "_n_dropped",
        "_n_duplicates",
        "_pending",
        "_ready",
        "_received",
        "ack_every",
        "max_ack_delay",
        "max_buffer",
        "max_ranges",
    )

    def __init__(
        self,
        *,
        max_buffer: int = 1024,
        ack_every: int = 2,
        max_ack_delay: float = 0.005,
        max_ranges: int = 64,
    ) -> None:
        if max_buffer < 1 or ack_every < 1 or max_ranges < 1 or max_ack_delay < 0:
            raise ValueError("need max_buffer, ack_every, max_ranges >= 1, max_ack_delay >= 0")
        self.max_buffer = max_buffer
        self.ack_every = ack_every
        self.max_ack_delay = max_ack_delay
        self.max_ranges = max_ranges
        self._received = RangeSet(max_ranges)
        self._expected = 0  # next seq to move to _ready
        self._buffer: dict[int, T] = {}  # seqs > _expected that arrived early
        self._ready: list[T] = []
        self._largest_pn = -1
        self._largest_time = 0.0
        self._pending = 0  # ack-eliciting packets since the last ACK
        self._deadline: float | None = None
        self._n_duplicates = 0
        self._n_dropped = 0
        self._n_delivered = 0

    def on_packet(
        self,
        packet_number: int,
        seq: int | None,
        item: T | None,
        now: float,
        ack_eliciting: bool = True,
    ) -> None:
        """Record packet ``packet_number``; buffer ``item`` if it carries stream ``seq``."""
        immediate = False
        if seq is not None:
            if item is None:
                raise ValueError("a packet with a seq must carry an item")
            expected = self._expected
            ready = self._ready
            if seq == expected and not self._buffer and len(ready) < self.max_buffer:
                ready.append(item)
                self._expected = expected + 1
            elif seq < expected or seq in self._buffer:
                self._n_duplicates += 1
                immediate = True  # our ACK was probably lost: resend it now
            elif seq >= expected - len(ready) + self.max_buffer:
                self._n_dropped += 1
                return
            else:
                self._buffer[seq] = item
                if seq == expected:
                    self._drain()
        largest = self._largest_pn
        if packet_number == largest + 1:
            self._received.add(packet_number)
            self._largest_pn = packet_number
            self._largest_time = now
        elif not self._received.add(packet_number):
            immediate = True  # duplicate packet
        elif packet_number > largest:
            # A gap: something before it is missing. Tell the sender at once so
            # its packet threshold fires (fast retransmit). Not for the first pn.
            immediate = immediate or largest >= 0
            self._largest_pn = packet_number
            self._largest_time = now
        else:
            immediate = True  # reordered: fills a gap
        if ack_eliciting:
            pending = self._pending + 1
            self._pending = pending
            if immediate or pending >= self.ack_every:
                self._deadline = now
            elif self._deadline is None:
                self._deadline = now + self.max_ack_delay

    def adopt_acks(self, old: ReliableReceiver[Any]) -> None:
        """Take over ``old``'s packet-number record and owed ACK (a RESET restarts the
        stream, not the packet numbers, which belong to the key)."""
        self._received = old._received
        self._largest_pn = old._largest_pn
        self._largest_time = old._largest_time
        self._pending = old._pending
        self._deadline = old._deadline

    def _drain(self) -> None:
        buffer = self._buffer
        ready = self._ready
        expected = self._expected
        while expected in buffer:
            ready.append(buffer.pop(expected))
            expected += 1
        self._expected = expected

    def pop(self) -> list[T]:
        """Items now deliverable in order (each exactly once)."""
        ready = self._ready
        if not ready:
            return []
        self._ready = []
        self._n_delivered += len(ready)
        return ready

    def ack_deadline(self) -> float | None:
        """When an ACK is due (may be in the past), or None if none is owed."""
        return self._deadline

    def should_ack_now(self, now: float) -> bool:
        deadline = self._deadline
        return deadline is not None and now >= deadline

    def build_ack(self, now: float) -> tuple[list[tuple[int, int]], float]:
        """Received packet numbers as descending inclusive ranges, and the ack delay.

        The delay is the time since the largest packet number arrived. Building
        an ACK clears the pending state: the caller is expected to send it.
        """
        self._pending = 0
        self._deadline = None
        ranges = self._received.descending(self.max_ranges)
        if not ranges:
            return ranges, 0.0
        delay = now - self._largest_time
        return ranges, delay if delay > 0.0 else 0.0

    @property
    def expected_seq(self) -> int:
        """The next seq to become ready."""
        return self._expected

    @property
    def buffered(self) -> int:
        """Items held: out of order plus ready and not yet popped."""
        return len(self._buffer) + len(self._ready)

    @property
    def stats(self) -> dict[str, float]:
        return {
            "duplicates": self._n_duplicates,
            "dropped_over_buffer": self._n_dropped,
            "items_delivered": self._n_delivered,
        }
