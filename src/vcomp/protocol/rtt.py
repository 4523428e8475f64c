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

The backed-off PTO differs from RFC 9002 in two ways, both so that many flows that
lost their whole windows in one congested queue recover soon after it drains:

* it stops doubling at ``max_backoff_pto`` (sessions: 1 s, RFC 6298's classic
  minimum RTO; see :func:`session_timer`), never below the PTO without backoff: a
  flow probes at least that often, so it notices a drained queue within about a
  second rather than after a doubling that may have reached tens of seconds;
* each expiry draws a factor j in [1/2, 1] (from ``rng``, if given) that scales
  the backed-off PTO, again never below the PTO without backoff: flows that lost
  their packets to the same overflow do not probe in step and overflow it again.

The PTO without backoff, and so the first probe after a loss, is RFC 9002's.
"""

from __future__ import annotations

import random

from vcomp.protocol import limits

DEFAULT_INITIAL_RTO = 1.0
DEFAULT_MIN_RTO = 0.2
DEFAULT_MAX_RTO = 60.0
SESSION_MAX_BACKOFF_PTO = 1.0
DEFAULT_GRANULARITY = 0.001
DEFAULT_MAX_ACK_DELAY = 0.025
JITTER_LOW = 0.5
"""A backed-off PTO is scaled by a factor drawn from [JITTER_LOW, 1] at each expiry."""


class RttEstimator:
    """SRTT/RTTVAR/RTO bookkeeping; all times in seconds."""

    __slots__ = (
        "_backoff",
        "_jitter",
        "_rng",
        "_rto",
        "granularity",
        "initial_rto",
        "latest_rtt",
        "max_ack_delay",
        "max_backoff_pto",
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
        max_backoff_pto: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        if max_backoff_pto is not None and not max_backoff_pto > 0:
            raise ValueError("max_backoff_pto must be positive")
        if not initial_rto > 0:
            raise ValueError("initial_rto must be positive")
        if granularity < 0 or max_ack_delay < 0:
            raise ValueError("granularity and max_ack_delay must not be negative")
        self.initial_rto = initial_rto
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.max_ack_delay = max_ack_delay
        # None: the PTO doubles up to max_rto, as in RFC 9002; no rng: no jitter.
        self.max_backoff_pto = max_backoff_pto if max_backoff_pto is not None else max_rto
        self._rng = rng
        self._jitter = 1.0  # drawn at each expiry; 1 without backoff
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
            self.clear_backoff()

    def clear_backoff(self) -> None:
        """The peer answered: the next timeout is the PTO without backoff again."""
        self._backoff = 0
        self._jitter = 1.0

    def on_timeout(self) -> None:
        """A retransmission timer expired: double the RTO (RFC 6298 rule 5.5) and the
        PTO (up to ``max_backoff_pto``), and draw the PTO's jitter for the next wait."""
        self._backoff += 1
        self._rto = min(self._rto * 2.0, self.max_rto)
        if self._rng is not None:
            self._jitter = self._rng.uniform(JITTER_LOW, 1.0)

    @property
    def base_pto(self) -> float:
        """RFC 9002, 6.2.1: SRTT + max(4 RTTVAR, G) + max_ack_delay, without backoff.

        Before the first sample it is the initial RTO. Unlike the RTO it has no
        ``min_rto`` floor: a tail loss on a short path costs about one RTT more, not 200 ms.
        """
        srtt = self.srtt
        if srtt is None:
            return self.initial_rto
        var4 = 4.0 * self.rttvar
        base = srtt + (var4 if var4 > self.granularity else self.granularity)
        return base + self.max_ack_delay

    @property
    def backoff_capped(self) -> bool:
        """True once doubling no longer lengthens the PTO (``max_backoff_pto`` reached,
        when it is below ``max_rto``)."""
        base = self.base_pto
        cap = self.max_backoff_pto
        if self._backoff == 0 or cap >= self.max_rto:
            return False
        return base * (1 << min(self._backoff, 32)) >= max(cap, base)

    @property
    def pto(self) -> float:
        """The probe timeout with backoff: ``base_pto`` doubled per timeout but at most
        ``max(max_backoff_pto, base_pto)``, scaled by the expiry's jitter but never
        below ``base_pto``; never above ``max_rto``."""
        base = self.base_pto
        backoff = self._backoff
        if backoff:
            cap = self.max_backoff_pto if self.max_backoff_pto > base else base
            pto = base * (1 << backoff) if backoff < 32 else cap
            if pto > cap:
                pto = cap
            pto *= self._jitter
            if pto < base:
                pto = base
        else:
            pto = base
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


def session_timer(rng: random.Random | None = None) -> RttEstimator:
    """A session's estimator: the backed-off PTO capped at ``SESSION_MAX_BACKOFF_PTO``
    and jittered (``rng``; a fresh one seeded by the OS when None)."""
    return RttEstimator(
        max_backoff_pto=SESSION_MAX_BACKOFF_PTO, rng=rng if rng is not None else random.Random()
    )


def handshake_timer(rng: random.Random | None = None) -> RttEstimator:
    """The handshake's retransmission timer, by the same expression as the channel's:
    before an RTT sample the PTO is ``HANDSHAKE_RETRANSMIT``; after one (a handshake
    datagram answered at its first try) it is RFC 9002's from that sample (6.2.2);
    it doubles per timeout, jittered, up to ``HANDSHAKE_RETRANSMIT_MAX``."""
    return RttEstimator(
        initial_rto=limits.HANDSHAKE_RETRANSMIT,
        min_rto=limits.HANDSHAKE_RETRANSMIT,
        max_rto=limits.HANDSHAKE_RETRANSMIT_MAX,
        max_backoff_pto=limits.HANDSHAKE_RETRANSMIT_MAX,
        rng=rng if rng is not None else random.Random(),
    )
