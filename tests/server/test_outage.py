"""StoreHealth with the GroupCommitter on a real SQLite store that another process locks."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.test_commit import enroll, lease_all, result
from tests.sqlite_lock import HeldLock
from vcomp.errors import StoreError, StoreUnavailable
from vcomp.server.commit import GroupCommitter
from vcomp.server.outage import RETRY_FIRST, RETRY_MAX, StoreHealth
from vcomp.server.store import OutcomeKind
from vcomp.server.store.sqlite import SqliteStore


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def count(self, event: str) -> int:
        return sum(f"event={event} " in line for line in self.lines)


@pytest.fixture
def lines() -> Iterator[Lines]:
    logger = logging.getLogger("vcomp.server")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def quick_store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A store whose writers give up on a held lock after 0.2 s."""
    s = SqliteStore(tmp_path / "store.db", busy_timeout=0.2)
    s.add_app("pi", "python", io.BytesIO(b"print(3.14)"))
    yield s
    s.close()


async def test_an_outage_is_logged_once_and_held_results_commit_once_after_it(
    tmp_path: Path, quick_store: SqliteStore, lines: Lines
) -> None:
    store = quick_store
    agent = enroll(store, "a")
    leases = lease_all(store, agent, 20)
    health = StoreHealth()
    health.watching = True
    committer = GroupCommitter(store, health=health)
    try:
        with HeldLock(tmp_path / "store.db"):
            outcomes = await asyncio.gather(
                *(committer.submit_result(result(lease)) for lease in leases),
                return_exceptions=True,
            )
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert "store.db" not in str(outcomes[0])  # the error's text, not where
            # More failures (a lease, a run) change nothing: still one line.
            with pytest.raises(StoreUnavailable):
                await committer.lease(agent, 0.0, 600.0)
            with pytest.raises(StoreUnavailable):
                await committer.run(store.prune_reset_requests, 0.0)
            assert not health.available
            # A call that must not be lost waits for the store's return.
            waiting = asyncio.ensure_future(committer.run_retrying(store.release_lease, 0, 0, "x"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            # Nothing was written while the lock was held.
            assert not any(store.result_exists(x.job_id, x.attempt) for x in leases)
        # The store is back: resend everything, twice over; each result is stored once.
        first = await asyncio.gather(*(committer.submit_result(result(x)) for x in leases))
        again = await asyncio.gather(*(committer.submit_result(result(x)) for x in leases))
        assert health.available
        with pytest.raises(StoreError):  # job 0 does not exist: the waiting call ran
            await waiting
    finally:
        await committer.close()
    assert {o.kind for o in first} == {OutcomeKind.ACCEPTED}
    assert {o.kind for o in again} == {OutcomeKind.DUPLICATE}
    for x in leases:
        assert [r.attempt for r in store.list_results(x.job_id)] == [x.attempt]
    assert lines.count("store_unavailable") == 1
    assert lines.count("store_available") == 1
    warning = next(line for line in lines.lines if "store_unavailable" in line)
    assert warning.startswith("WARNING ") and "database is locked" in warning


async def test_a_failed_start_is_not_logged_as_an_outage(
    tmp_path: Path, quick_store: SqliteStore, lines: Lines
) -> None:
    committer = GroupCommitter(quick_store)  # not watching: the caller reports the failure
    try:
        with HeldLock(tmp_path / "store.db"), pytest.raises(StoreUnavailable):
            await committer.run(quick_store.prune_reset_requests, 0.0)
        await committer.run(quick_store.prune_reset_requests, 0.0)
        committer.health.answered()
    finally:
        await committer.close()
    assert lines.lines == []


def test_retry_delay_doubles_to_its_cap_with_jitter() -> None:
    health = StoreHealth()
    health.lost(StoreUnavailable("gone"))
    delays = [health.retry_delay() for _ in range(10)]
    caps = [min(RETRY_MAX, RETRY_FIRST * 2**i) for i in range(10)]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True)), delays
    assert len(set(delays)) > 1
