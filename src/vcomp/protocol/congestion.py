"""Congestion control and pacing for one sending direction (sans-I/O).

NewReno as in RFC 9002 section 7 (appendix B), counted in bytes:

* the window starts at ``min(10 * max_datagram, max(2 * max_datagram, 14720))``;
* slow start adds every newly acknowledged byte, congestion avoidance one
  ``max_datagram`` per window acknowledged;
* the first loss of a packet sent after the current recovery period started
  halves the window once (a recovery period ends with the first acknowledgement
  of a packet sent after it began);
* persistent congestion (section 7.6) collapses the window to ``2 * max_datagram``;
* acknowledgements that arrive while the sender was application- or
  flow-control-limited do not grow the window (section 7.8).

:class:`Pacer` spreads a window over a round trip (section 7.7): a token bucket
filled at ``1.25 * cwnd / smoothed_rtt`` that holds an initial window, or two
milliseconds of the rate where that is more (event-loop timers are that coarse).

Nothing here reads a clock or does I/O: ``now`` is always passed in. Which
controller a side uses is its own choice (see ``make_controller``); the peer
cannot tell and need not agree.
"""

from __future__ import annotations

from typing import Final, Protocol

from vcomp.errors import ConfigError

MAX_DATAGRAM: Final = 1472
"""Bytes one data packet may take on the wire (``limits.MAX_DATAGRAM``)."""
LOSS_REDUCTION: Final = 0.5
PACING_GAIN: Final = 1.25
PERSISTENT_CONGESTION_THRESHOLD: Final = 3
PACING_GRANULARITY: Final = 0.001
"""A paced sender wakes for at least this much of its rate (or one packet): waking per
packet at loopback rates costs more CPU than the packets themselves. Timers of event
loops are about this coarse too (uvloop counts in milliseconds)."""
ALGORITHMS: Final = ("newreno", "cubic")


def initial_window(max_datagram: int = MAX_DATAGRAM) -> int:
    """RFC 9002, 7.2: ten datagrams, but at most max(14720 bytes, two datagrams)."""
    return min(10 * max_datagram, max(2 * max_datagram, 14720))


class CongestionController(Protocol):
    """What :class:`~vcomp.protocol.reliability.ReliableSender` asks of a controller."""

    max_datagram: int

    @property
    def cwnd(self) -> int: ...
    @property
    def ssthresh(self) -> float: ...
    @property
    def in_recovery_since(self) -> float | None: ...
    def on_acked(self, size: int, sent_at: float, now: float, app_limited: bool) -> None: ...
    def on_congestion(self, sent_at: float, now: float) -> None: ...
    def on_persistent_congestion(self) -> None: ...


class NewReno:
    """RFC 9002 appendix B, in bytes."""

    __slots__ = ("_cwnd", "_recovery_start", "_ssthresh", "acked_in_ca", "max_datagram")

    def __init__(self, *, max_datagram: int = MAX_DATAGRAM) -> None:
        if max_datagram < 1:
            raise ValueError("max_datagram must be positive")
        self.max_datagram = max_datagram
        self._cwnd = initial_window(max_datagram)
        self._ssthresh = float("inf")
        self._recovery_start: float | None = None
        self.acked_in_ca = 0  # bytes acked in congestion avoidance, not yet a whole window

    @property
    def cwnd(self) -> int:
        return self._cwnd

    @property
    def ssthresh(self) -> float:
        return self._ssthresh

    @property
    def minimum_window(self) -> int:
        return 2 * self.max_datagram

    @property
    def in_recovery_since(self) -> float | None:
        return self._recovery_start

    def _in_recovery(self, sent_at: float) -> bool:
        start = self._recovery_start
        return start is not None and sent_at <= start

    def on_acked(self, size: int, sent_at: float, now: float, app_limited: bool) -> None:
        """A packet of ``size`` bytes sent at ``sent_at`` was newly acknowledged."""
        if self._in_recovery(sent_at) or app_limited:
            return
        if self._cwnd < self._ssthresh:
            self._cwnd += size
            return
        # Congestion avoidance: one datagram per cwnd of acknowledged bytes.
        acked = self.acked_in_ca + size
        if acked >= self._cwnd:
            acked -= self._cwnd
            self._cwnd += self.max_datagram
        self.acked_in_ca = acked

    def on_congestion(self, sent_at: float, now: float) -> None:
        """Loss of a packet sent at ``sent_at``: one reduction per recovery period."""
        if self._in_recovery(sent_at):
            return
        self._recovery_start = now
        self._ssthresh = self._cwnd * LOSS_REDUCTION
        self._cwnd = max(int(self._ssthresh), self.minimum_window)
        self.acked_in_ca = 0

    def on_persistent_congestion(self) -> None:
        self._cwnd = self.minimum_window
        self._recovery_start = None
        self.acked_in_ca = 0


class Cubic(NewReno):
    """CUBIC (RFC 9438) in congestion avoidance; slow start and recovery as NewReno.

    ``W_cubic(t) = C (t - K)^3 + W_max`` with C = 0.4 and beta = 0.7, in datagrams,
    with the Reno-friendly estimate of section 4.3 as a floor.
    """

    __slots__ = ("_epoch_start", "_grow", "_k", "_w_est", "_w_max")

    C: Final = 0.4
    BETA: Final = 0.7

    def __init__(self, *, max_datagram: int = MAX_DATAGRAM) -> None:
        super().__init__(max_datagram=max_datagram)
        self._w_max = 0.0
        self._k = 0.0
        self._epoch_start: float | None = None
        self._w_est = 0.0
        self._grow = 0.0

    def on_acked(self, size: int, sent_at: float, now: float, app_limited: bool) -> None:
        if self._in_recovery(sent_at) or app_limited:
            return
        if self._cwnd < self._ssthresh:
            self._cwnd += size
            return
        mss = self.max_datagram
        cwnd = self._cwnd / mss
        if self._epoch_start is None:
            # A congestion-avoidance epoch begins (after slow start without a loss, W_max
            # is the current window: K = 0).
            self._epoch_start = now
            if self._w_max < cwnd:
                self._w_max = cwnd
                self._k = 0.0
            self._w_est = cwnd
        t = now - self._epoch_start
        target = self.C * (t - self._k) ** 3 + self._w_max
        # Reno-friendly region (RFC 9438 4.3): alpha = 3 (1 - beta) / (1 + beta).
        alpha = 3.0 * (1.0 - self.BETA) / (1.0 + self.BETA)
        self._w_est += alpha * (size / mss) / cwnd
        if self._w_est > target:
            target = self._w_est
        # At most 1.5x growth per RTT (4.2); grow by (target - cwnd) / cwnd per datagram.
        target = min(target, 1.5 * cwnd)
        if target > cwnd:
            # (target - cwnd) / cwnd datagrams per datagram acked, kept in bytes.
            self._grow += size * (target - cwnd) / cwnd
            if self._grow >= 1.0:
                whole = int(self._grow)
                self._grow -= whole
                self._cwnd += whole

    def on_congestion(self, sent_at: float, now: float) -> None:
        if self._in_recovery(sent_at):
            return
        mss = self.max_datagram
        cwnd = self._cwnd / mss
        # Fast convergence (4.7): a flow whose W_max shrinks releases bandwidth sooner.
        self._w_max = cwnd * (1.0 + self.BETA) / 2.0 if cwnd < self._w_max else cwnd
        self._recovery_start = now
        self._ssthresh = self._cwnd * self.BETA
        self._cwnd = max(int(self._ssthresh), self.minimum_window)
        self._k = ((self._w_max - self._cwnd / mss) / self.C) ** (1.0 / 3.0)
        self._epoch_start = None
        self.acked_in_ca = 0

    def on_persistent_congestion(self) -> None:
        super().on_persistent_congestion()
        self._epoch_start = None
        self._w_max = 0.0


def make_controller(name: str, *, max_datagram: int = MAX_DATAGRAM) -> NewReno:
    """The controller called ``name`` (``"newreno"`` or ``"cubic"``)."""
    if name == "newreno":
        return NewReno(max_datagram=max_datagram)
    if name == "cubic":
        return Cubic(max_datagram=max_datagram)
    raise ConfigError(f"unknown congestion controller {name!r} (choose one of {ALGORITHMS})")


class Pacer:
    """A token bucket that says when the next packet may leave (RFC 9002, 7.7).

    Before the first RTT sample nothing is paced: the initial window may leave
    as one burst, as the RFC allows.
    """

    __slots__ = ("_budget", "_last", "_rate", "burst", "min_burst", "next_send_time")

    def __init__(self, *, burst: int = initial_window()) -> None:
        self.min_burst = burst
        self.burst = burst
        self._budget = float(burst)
        self._last: float | None = None
        self._rate = 0.0  # bytes per second; 0 means unpaced
        self.next_send_time: float | None = None  # set while the bucket is empty

    @property
    def rate(self) -> float:
        return self._rate

    def update_rate(self, cwnd: int, srtt: float | None) -> None:
        """Rate = 1.25 * cwnd / srtt; unpaced before any RTT sample."""
        if srtt is None or srtt <= 0.0:
            self._rate = 0.0
            self.burst = self.min_burst
        else:
            rate = self._rate = PACING_GAIN * cwnd / srtt
            # Event-loop timers fire late (uvloop: 1 ms steps): the bucket must hold
            # two steps of the rate, or the timer, not the path, sets the pace.
            step = int(rate * 2 * PACING_GRANULARITY)
            self.burst = step if step > self.min_burst else self.min_burst

    def can_send(self, size: int, now: float) -> bool:
        """True if ``size`` bytes may leave now; else :attr:`next_send_time` says when."""
        rate = self._rate
        if rate <= 0.0:
            self.next_send_time = None
            return True
        last = self._last
        budget = self._budget
        if last is not None and now > last:
            budget += (now - last) * rate
            if budget > self.burst:
                budget = float(self.burst)
        self._budget = budget
        self._last = now
        # Within a byte counts as enough: the refill computed for next_send_time
        # may round just short of ``size``, and the timer must not fire for nothing.
        if budget > size - 1.0:
            self.next_send_time = None
            return True
        # Wait for a millisecond's worth (at most a burst) rather than one packet's.
        quantum = rate * PACING_GRANULARITY
        if quantum > self.burst:
            quantum = float(self.burst)
        if quantum < size:
            quantum = float(size)
        self.next_send_time = now + (quantum - budget) / rate
        return False

    def on_sent(self, size: int, now: float) -> None:
        if self._last is None:
            self._last = now
        self._budget -= size
