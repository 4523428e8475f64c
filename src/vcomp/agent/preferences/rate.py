"""``max_upload_rate`` / ``max_download_rate``: a token bucket of bytes per second.

Clock-free: callers pass ``now``. The transport adapter owns the clock and asks
:meth:`TokenBucket.delay` how long to wait before the next datagram may go (or be read).
"""

from __future__ import annotations

MIN_BURST = 16 * 1024  # at least a few datagrams, so a low rate still sends whole ones


class TokenBucket:
    """``rate`` bytes per second, with a burst of one second's worth (at least MIN_BURST)."""

    def __init__(self, rate: int, now: float) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = max(float(rate), float(MIN_BURST))
        self._tokens = self.burst
        self._at = now
        self.taken = 0  # bytes charged in all

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def delay(self, now: float) -> float:
        """Seconds until a datagram may pass (0.0: now). Debt is paid before the next."""
        self._refill(now)
        return 0.0 if self._tokens > 0 else -self._tokens / self.rate + 1e-3

    def take(self, size: int, now: float) -> None:
        """Charge ``size`` bytes that went (the balance may go negative: paid by waiting)."""
        self._refill(now)
        self._tokens -= size
        self.taken += size
