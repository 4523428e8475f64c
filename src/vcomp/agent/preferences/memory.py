"""``max_memory``: the memory all of this agent's running jobs may hold together.

A job's memory limit is reserved before it starts and released when it ends. A job
that fits once others end waits; one whose limit alone exceeds the cap can never fit,
so it is refused back to the server (which leases it elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class MemoryBudget:
    """Reservations against ``total`` bytes (0: no cap)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0
        self._released = asyncio.Event()

    def refusal(self, memory_bytes: int) -> str | None:
        """Why a job of this limit can never run here, or None."""
        if self.total and memory_bytes > self.total:
            return f"memory_bytes {memory_bytes} above this volunteer's max_memory {self.total}"
        return None

    def fits(self, memory_bytes: int) -> bool:
        return not self.total or self.reserved + memory_bytes <= self.total

    @contextlib.asynccontextmanager
    async def reserve(self, memory_bytes: int) -> AsyncIterator[None]:
        """Hold ``memory_bytes`` for the body, waiting until they fit."""
        if self.refusal(memory_bytes) is not None:
            raise ValueError("a job above max_memory must be refused, not reserved")
        while not self.fits(memory_bytes):
            await self._released.wait()
        self.reserved += memory_bytes
        try:
            yield
        finally:
            # Synchronous, so a second cancellation cannot leak the reservation.
            self.reserved -= memory_bytes
            self._released.set()
            self._released = asyncio.Event()
