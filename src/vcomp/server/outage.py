"""Whether the job store answers: the outage state, its two log lines, the retry pace.

A store that cannot be reached (PostgreSQL refused, lost or restarting; SQLite's lock
held past the busy timeout, a disk I/O error) raises
:class:`~vcomp.errors.StoreUnavailable`. The server does not end sessions for it:

- the :class:`~vcomp.server.commit.GroupCommitter` reports every StoreUnavailable to
  :class:`StoreHealth`, which marks the store away and logs that once (WARNING
  ``store_unavailable`` with the error's text; a store URL never appears in it);
- while it is away the server leases nothing and its tick makes one store call, a
  probe, paced by :meth:`StoreHealth.retry_delay` (0.25 s doubling to 5 s, jittered,
  so servers sharing one database do not probe in step);
- work that must not be lost (a result's commit, a release) waits in
  :meth:`StoreHealth.wait_back` and is repeated; repeating is safe because results
  are idempotent on ``(job, attempt)``;
- the first successful probe, result commit or lease marks the store back: one INFO
  ``store_available`` line with the outage's length, then the listeners run (the
  scheduler renews and resumes leasing).

Only writes mark the store back: on SQLite reads keep working while another process
holds the write lock, so a read answering says nothing about the outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from vcomp import logfmt
from vcomp.errors import StoreUnavailable

__all__ = ["RETRY_FIRST", "RETRY_MAX", "StoreHealth"]

log = logging.getLogger("vcomp.server")

RETRY_FIRST = 0.25
RETRY_MAX = 5.0
"""Seconds between probes of an unavailable store: the first, and the cap of the doubling."""


class StoreHealth:
    """Up or down, as the last store call said; lives on the event loop's thread."""

    def __init__(self) -> None:
        self.available = True
        self.outages = 0
        self.watching = False  # set once the server runs: a failed start says it in one line
        self._logged = False  # this outage's store_unavailable line was written
        self._back: asyncio.Event | None = None  # made on first wait, inside the loop
        self._down_since = 0.0
        self._delay = RETRY_FIRST
        self._listeners: list[Callable[[], None]] = []

    def on_back(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` each time the store answers again after an outage."""
        self._listeners.append(listener)

    def lost(self, exc: StoreUnavailable) -> None:
        """A store call failed with StoreUnavailable (logged on the first one only)."""
        if not self.available:
            return
        self.available = False
        self.outages += 1
        self._down_since = time.monotonic()
        self._delay = RETRY_FIRST
        if self._back is not None:
            self._back.clear()
        self._logged = self.watching
        if self._logged:
            logfmt.event(log, "store_unavailable", logging.WARNING, error=str(exc)[:300])

    def answered(self) -> None:
        """A store write succeeded: the store is back if it was away."""
        if self.available:
            return
        self.available = True
        if self._back is not None:
            self._back.set()
        outage = time.monotonic() - self._down_since
        if self._logged:
            logfmt.event(log, "store_available", outage_s=f"{outage:.3f}")
        for listener in self._listeners:
            listener()

    def retry_delay(self) -> float:
        """Seconds to wait before the next probe: doubling up to RETRY_MAX, jittered."""
        delay = self._delay
        self._delay = min(RETRY_MAX, self._delay * 2)
        return delay * random.uniform(0.5, 1.0)

    async def wait_back(self) -> None:
        """Return once the store is available (at once if it is)."""
        if self.available:
            return
        if self._back is None:
            self._back = asyncio.Event()
        await self._back.wait()
