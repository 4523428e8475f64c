"""ResultSink and UploadBudget, against a real SqliteStore and GroupCommitter."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from vcomp.errors import StoreError
from vcomp.server.commit import GroupCommitter
from vcomp.server.results import INLINE_LIMIT, WRITE_BATCH, ResultSink, UploadBudget
from vcomp.server.store import Lease
from vcomp.server.store.sqlite import SqliteStore

from .test_commit import enroll

CHUNK = b"r" * 1200


def leased(store: SqliteStore, output_bytes: int) -> Lease:
    store.create_batch("pi", [b"0"], output_bytes=output_bytes)
    got = store.lease_next(enroll(store, "a"), 0.0, 600.0)
    assert got is not None
    return got


async def _feed(sink: ResultSink, total: int) -> bool:
    for offset in range(0, total, len(CHUNK)):
        if not sink.feed(offset, CHUNK[: min(len(CHUNK), total - offset)]):
            return False
        if offset % WRITE_BATCH == 0:
            await asyncio.sleep(0)  # let the writer run, as the event loop would
    return True


async def test_a_failed_writer_keeps_nothing(store: SqliteStore, committer: GroupCommitter) -> None:
    """The store refuses the staging blob (the result is over the job's output limit):
    the sink must stop holding bytes, not queue them for a writer that is gone."""
    lease = leased(store, output_bytes=1 << 20)
    budget = UploadBudget(1 << 30)
    total = 8 << 20
    sink = ResultSink(store, committer, lease.job_id, lease.attempt, total, budget)
    first = WRITE_BATCH + len(CHUNK)  # one full batch: the writer starts, and fails
    assert await _feed_from(sink, 0, first)
    for _ in range(3):  # the writer asks the store, which refuses; the writer sees it
        await asyncio.sleep(0)
        await committer.run(lambda: None)
    assert await _feed_from(sink, first, total)
    assert budget.used == 0
    with pytest.raises(StoreError, match="staging the result failed"):
        await sink.finish(hashlib.sha256((CHUNK * (total // len(CHUNK) + 1))[:total]).digest())


async def _feed_from(sink: ResultSink, start: int, total: int) -> bool:
    for offset in range(start, total, len(CHUNK)):
        if not sink.feed(offset, CHUNK[: min(len(CHUNK), total - offset)]):
            return False
    return True


async def test_the_budget_bounds_bytes_held(store: SqliteStore, committer: GroupCommitter) -> None:
    lease = leased(store, output_bytes=1 << 20)
    budget = UploadBudget(3 * INLINE_LIMIT)
    sinks = [
        ResultSink(store, committer, lease.job_id, lease.attempt, INLINE_LIMIT, budget)
        for _ in range(4)
    ]
    fed = [await _feed(s, INLINE_LIMIT) for s in sinks]
    assert fed == [True, True, True, False]  # the fourth upload does not fit
    assert budget.used <= budget.limit
    for sink in sinks:
        await sink.abandon()
    assert budget.used == 0


async def test_inline_and_staged_results_give_their_bytes_back(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    lease = leased(store, output_bytes=4 << 20)
    budget = UploadBudget(1 << 30)
    for total in (1000, 3 << 20):
        data = (CHUNK * (total // len(CHUNK) + 1))[:total]
        sink = ResultSink(store, committer, lease.job_id, lease.attempt, total, budget)
        assert await _feed(sink, total)
        output, upload = await sink.finish(hashlib.sha256(data).digest())
        assert (output == data) if upload is None else (output is None)
        assert budget.used == 0
        if upload is not None:
            store.discard_upload(upload)
