"""Round-trip time estimation, the probe timeout (RFC 9002) and the RTO (RFC 6298).

The reliable sender uses :attr:`RttEstimator.pto` (RFC 9002, 6.2.1); the RFC 6298
RTO below is still computed (and reported) alongside it.

    first sample R:   SRTT = R, RTTVAR = R / 2
    later samples R:  RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|, then SRTT = 7/8 SRTT + 1/8 R
    RTO = SRTT + max(G, 4 * RTTVAR), clamped to [min_rto, max_rto]

Deviations from RFC 6298, all deliberate:

* ``min_rto`` defaults to 0.2 s instead of 1 s, as Linux and QUIC stacks do; a
  1 s floor makes every loss on a LAN cost a full second.
* Karn's algorithm is unnecessary: a retransmission carries a new packet number,
  so every acknowledged packet number names exactly one transmission and gives
  an unambiguous sample.
* As in QUIC (RFC 9002 section 5.3), the delay the receiver reports between
  receiving a packet and sending its ACK is subtracted from the sample, bounded
  by ``max_ack_delay`` and never below the smallest RTT seen.

Exponential backoff: every retransmission timeout doubles the RTO (up to
``max_rto``); the next valid sample removes the backoff.
"""

from __future__ import annotations

from vcomp.protocol import limits

DEFAULT_INITIAL_RTO = 1.0
DEFAULT_MIN_RTO = 0.2
DEFAULT_MAX_RTO = 60.0
DEFAULT_GRANULARITY = 0.001
DEFAULT_MAX_ACK_DELAY = 0.025


class RttEstimator:
    """SRTT/RTTVAR/RTO bookkeeping; all times in seconds."""

    __slots__ = (
        "_backoff",
        "_rto",
        "granularity",
        "initial_rto",
        "latest_rtt",
        "max_ack_delay",
        "max_rto",
        "min_rto",
        "min_rtt",
        "rttvar",
        "srtt",
    )

    def __init__(
        self,
        *,
        initial_rto: float = DEFAULT_INITIAL_RTO,
        min_rto: float = DEFAULT_MIN_RTO,
        max_rto: float = DEFAULT_MAX_RTO,
        granularity: float = DEFAULT_GRANULARITY,
        max_ack_delay: float = DEFAULT_MAX_ACK_DELAY,
    ) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        if not initial_rto > 0:
            raise ValueError("initial_rto must be positive")
        if granularity < 0 or max_ack_delay < 0:
            raise ValueError("granularity and max_ack_delay must not be negative")
        self.initial_rto = initial_rto
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.max_ack_delay = max_ack_delay
        self.srtt: float | None = None
        self.rttvar = 0.0  # meaningful once srtt is set
        self.latest_rtt: float | None = None
        self.min_rtt: float | None = None
        self._backoff = 0
        self._rto = min(max(initial_rto, min_rto), max_rto)

    @property
    def rto(self) -> float:
        """The current retransmission timeout, backoff included."""
        return self._rto

    @property
    def backoff(self) -> int:
        """How many timeouts in a row have doubled the RTO."""
        return self._backoff

    def on_sample(self, rtt: float, ack_delay: float = 0.0) -> None:
        """Feed one measured round trip (``now - send time``) and the peer's ack delay."""
        # Runs once per ACK: plain comparisons instead of min/max/abs calls.
        if not rtt >= 0.0:  # also rejects NaN
            return
        min_rtt = self.min_rtt
        if min_rtt is None or rtt < min_rtt:
            self.min_rtt = min_rtt = rtt
        adjusted = rtt
        if ack_delay > 0.0:  # False for NaN
            # The peer chooses ack_delay: bound it, and never let it push a
            # sample below the smallest RTT actually observed.
            delay = ack_delay if ack_delay < self.max_ack_delay else self.max_ack_delay
            if rtt - delay >= min_rtt:
                adjusted = rtt - delay
        srtt = self.srtt
        if srtt is None:
            srtt = adjusted
            rttvar = adjusted * 0.5
        else:
            diff = srtt - adjusted
            rttvar = 0.75 * self.rttvar + 0.25 * (diff if diff >= 0.0 else -diff)
            srtt = 0.875 * srtt + 0.125 * adjusted
        self.srtt = srtt
        self.rttvar = rttvar
        self.latest_rtt = rtt
        var4 = 4.0 * rttvar
        rto = srtt + (var4 if var4 > self.granularity else self.granularity)
        if rto < self.min_rto:
            rto = self.min_rto
        elif rto > self.max_rto:
            rto = self.max_rto
        self._rto = rto
        if self._backoff:
            self._backoff = 0

    def on_timeout(self) -> None:
        """A retransmission timer expired: double the RTO (RFC 6298 rule 5.5)."""
        self._backoff += 1
        self._rto = min(self._rto * 2.0, self.max_rto)

    @property
    def pto(self) -> float:
        """RFC 9002, 6.2.1: SRTT + max(4 RTTVAR, G) + max_ack_delay, doubled per backoff.

        Before the first sample it is the initial RTO (doubled likewise); never above
        ``max_rto``. Unlike the RTO it has no ``min_rto`` floor: a tail loss on a
        short path costs about one RTT more, not 200 ms.
        """
        srtt = self.srtt
        if srtt is None:
            base = self.initial_rto
        else:
            var4 = 4.0 * self.rttvar
            base = srtt + (var4 if var4 > self.granularity else self.granularity)
            base += self.max_ack_delay
        pto = base * (1 << self._backoff) if self._backoff < 32 else self.max_rto
        return pto if pto < self.max_rto else self.max_rto

    def loss_delay(self) -> float:
        """Time threshold for loss detection: 9/8 * max(SRTT, latest RTT) (RFC 9002)."""
        if self.srtt is None or self.latest_rtt is None:
            return min(max(self.initial_rto, self.min_rto), self.max_rto)
        return max(1.125 * max(self.srtt, self.latest_rtt), self.granularity)

    def __repr__(self) -> str:
        return (
            f"RttEstimator(srtt={self.srtt}, rttvar={self.rttvar}, rto={self._rto}, "
            f"backoff={self._backoff})"
        )


def handshake_timer() -> RttEstimator:
    """The handshake's retransmission timer: no RTT sample yet, so the PTO is the
    initial one (``HANDSHAKE_RETRANSMIT``) doubled per timeout up to
    ``HANDSHAKE_RETRANSMIT_MAX``, by the same expression as the channel's."""
    return RttEstimator(
        initial_rto=limits.HANDSHAKE_RETRANSMIT,
        min_rto=limits.HANDSHAKE_RETRANSMIT,
        max_rto=limits.HANDSHAKE_RETRANSMIT_MAX,
    )
