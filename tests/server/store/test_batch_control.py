"""Cancelling a batch and resubmitting its failed jobs, on every backend.

Judged by what the store then does: what is leased, what a late result changes, what
the new batch holds.
"""

from __future__ import annotations

import pytest

from tests.server.store.support import lease, ok
from vcomp.errors import StoreError
from vcomp.server.store import JobState, Store


def test_cancel_stops_leasing_and_a_late_result_counts_for_nothing(
    store: Store, agents: list[str], app: str
) -> None:
    batch = store.create_batch(app, [b"a", b"b", b"c", b"d"])
    running = lease(store, agents[0], now=1.0)
    store.record_results([ok(lease(store, agents[1], now=1.0))])  # one job done before
    assert store.cancel_batch(batch) == 3  # two queued, one leased
    assert store.lease_next(agents[2], 2.0, 30.0) is None  # nothing of it leased again
    store.record_results([ok(running)])  # the running job's result arrives anyway
    job = store.get_job(running.job_id)
    assert (job.state, job.reason) == (JobState.FAILED, "cancelled")
    assert [r.counted for r in store.list_results(running.job_id)] == [False]
    status = store.batch_status(batch)
    assert (status.done, status.failed, status.cancelled) == (1, 0, 3)
    assert status.cancelled_at is not None and status.finished
    assert store.cancel_batch(batch) == 0  # twice is harmless
    with pytest.raises(StoreError, match="unknown batch"):
        store.cancel_batch(999)


def test_retry_resubmits_only_the_failed_jobs_with_the_same_limits(
    store: Store, agents: list[str], app: str
) -> None:
    batch = store.create_batch(
        app, [b"in-0", b"in-1", b"in-2"], max_attempts=1, memory_bytes=123 << 20
    )
    first = lease(store, agents[0], now=1.0)
    second = lease(store, agents[1], now=1.0)
    store.record_results([ok(first, status="error", error="crashed")])  # index 0 fails
    store.record_results([ok(second)])  # index 1 done
    store.cancel_batch(batch)  # index 2 cancelled: not a failure to retry
    new, indices = store.retry_failed(batch)
    assert new is not None and indices == [store.get_job(first.job_id).index]
    again = store.get_batch(new)
    old = store.get_batch(batch)
    assert (again.n_jobs, again.app, again.limits) == (1, old.app, old.limits)
    job = store.get_job_by_index(new, 0)
    assert store.read_input_chunk(job.job_id, 0, 100) == b"in-0"
    assert store.get_job(first.job_id).state is JobState.FAILED  # its history stays
    assert store.retry_failed(new) == (None, [])
