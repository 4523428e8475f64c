"""max_memory: reservations wait for room, never exceed the cap, and survive cancellation."""

from __future__ import annotations

import asyncio

import pytest

from vcomp.agent.config import VolunteerLimits
from vcomp.agent.preferences.memory import MemoryBudget


async def test_a_job_that_does_not_fit_waits_for_room() -> None:
    budget = MemoryBudget(300)
    order: list[str] = []

    async def job(name: str, size: int, hold: asyncio.Event) -> None:
        async with budget.reserve(size):
            order.append(f"start {name}")
            assert budget.reserved <= budget.total
            await hold.wait()
        order.append(f"end {name}")

    first, second = asyncio.Event(), asyncio.Event()
    a = asyncio.ensure_future(job("a", 200, first))
    b = asyncio.ensure_future(job("b", 200, second))
    await asyncio.sleep(0.05)
    assert order == ["start a"] and budget.reserved == 200
    first.set()
    second.set()
    await asyncio.gather(a, b)
    assert order == ["start a", "end a", "start b", "end b"]
    assert budget.reserved == 0


async def test_cancelled_waiter_and_holder_release_nothing_twice() -> None:
    budget = MemoryBudget(100)
    forever = asyncio.Event()

    async def job(size: int) -> None:
        async with budget.reserve(size):
            await forever.wait()

    holder = asyncio.ensure_future(job(80))
    waiter = asyncio.ensure_future(job(50))
    await asyncio.sleep(0.02)
    waiter.cancel()
    holder.cancel()
    await asyncio.gather(holder, waiter, return_exceptions=True)
    assert budget.reserved == 0


def test_a_job_that_can_never_fit_is_refused_with_the_reason() -> None:
    budget = MemoryBudget(1 << 30)
    assert budget.refusal(1 << 30) is None
    reason = budget.refusal((1 << 30) + 1)
    assert reason is not None and "max_memory" in reason
    assert MemoryBudget(0).refusal(1 << 60) is None


async def test_reserving_above_the_cap_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="refused"):
        async with MemoryBudget(10).reserve(11):
            pass


def test_ready_declares_the_cap() -> None:
    # The server leases only jobs within READY's memory, so it never sends one above the cap.
    limits = VolunteerLimits(max_memory_bytes=2 << 30)
    assert limits.capacity(1 << 30).memory_bytes == 1 << 30
    assert limits.capacity(0).memory_bytes == 2 << 30
    assert limits.capacity(4 << 30).memory_bytes == 2 << 30
