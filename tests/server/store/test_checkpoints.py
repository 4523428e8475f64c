"""Uploaded checkpoints in the store, on every backend: kept only from the agent holding
the live lease of that (job, attempt), one per job (the newest), and still there when
the job is leased again to another agent."""

from __future__ import annotations

import pytest

from tests.server.store.conftest import RowCounter
from tests.server.store.support import lease, ok
from vcomp.errors import StoreError
from vcomp.server.store import Store


def test_the_holder_saves_and_a_later_attempt_on_another_agent_reads_it(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"1"])
    first = lease(store, agents[0], now=0.0, seconds=10.0)
    assert store.latest_checkpoint(first.job_id) is None
    store.save_checkpoint(first.job_id, first.attempt, agents[0], b"state-1")
    store.save_checkpoint(first.job_id, first.attempt, agents[0], b"state-2")
    store.expire_leases(100.0)  # agent 0 vanished; the lease runs out
    second = lease(store, agents[1], now=101.0)
    assert second.job_id == first.job_id and second.attempt != first.attempt
    got = store.latest_checkpoint(second.job_id)
    assert got is not None
    assert (got.attempt, got.data) == (first.attempt, b"state-2")


def test_a_newer_checkpoint_replaces_the_old_blob(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    store.create_batch(app, [b"1"])
    held = lease(store, agents[0])
    store.save_checkpoint(held.job_id, held.attempt, agents[0], b"a" * 1000)
    blobs = count_rows("blobs")
    for i in range(50):
        store.save_checkpoint(held.job_id, held.attempt, agents[0], b"%d" % i)
    assert count_rows("blobs") == blobs  # one checkpoint blob per job, however many saves
    assert count_rows("job_checkpoints") == 1
    got = store.latest_checkpoint(held.job_id)
    assert got is not None and got.data == b"49"


def test_refused_without_the_live_lease_and_nothing_is_kept(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    store.create_batch(app, [b"1", b"2"])
    mine = lease(store, agents[0], now=0.0, seconds=10.0)
    theirs = lease(store, agents[1], now=0.0, seconds=10.0)
    blobs = count_rows("blobs")
    forged = [
        (theirs.job_id, theirs.attempt, agents[0]),  # another agent's lease
        (mine.job_id, mine.attempt + 1, agents[0]),  # an attempt that does not exist
        (10**9, 1, agents[0]),  # a job that does not exist
        (mine.job_id, mine.attempt, "f" * 64),  # an agent that is not enrolled
    ]
    for job_id, attempt, agent in forged:
        with pytest.raises(StoreError, match="no live lease"):
            store.save_checkpoint(job_id, attempt, agent, b"evil")
    with pytest.raises(StoreError, match="exceeds the 16-byte bound"):
        store.save_checkpoint(mine.job_id, mine.attempt, agents[0], b"x" * 17, max_bytes=16)
    store.expire_leases(100.0)
    with pytest.raises(StoreError, match="no live lease"):  # the lease ran out
        store.save_checkpoint(mine.job_id, mine.attempt, agents[0], b"late")
    assert count_rows("blobs") == blobs
    assert count_rows("job_checkpoints") == 0
    assert store.latest_checkpoint(mine.job_id) is None
    assert store.latest_checkpoint(theirs.job_id) is None


def test_checkpoints_of_finished_jobs_are_dropped_with_their_blobs(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    store.create_batch(app, [b"1", b"2"])
    done = lease(store, agents[0])
    running = lease(store, agents[1])
    blobs = count_rows("blobs")
    store.save_checkpoint(done.job_id, done.attempt, agents[0], b"d")
    store.save_checkpoint(running.job_id, running.attempt, agents[1], b"r")
    store.record_results([ok(done)])
    assert store.drop_finished_checkpoints() == 1
    assert store.latest_checkpoint(done.job_id) is None
    kept = store.latest_checkpoint(running.job_id)
    assert kept is not None and kept.data == b"r"  # still running: kept for a resume
    assert count_rows("blobs") == blobs + 2  # the kept checkpoint and the stored output
    assert store.drop_finished_checkpoints() == 0


def test_an_earlier_attempt_never_replaces_a_later_attempts_checkpoint(
    store: Store, app: str, agents: list[str]
) -> None:
    """Two live attempts of one job (replicas): the later one's state is the one kept,
    and reading it opens a range reader over the same bytes."""
    store.create_batch(app, [b"1"], replicas=2, quorum=2)
    first = lease(store, agents[0], now=0.0, seconds=600.0)
    second = lease(store, agents[1], now=0.0, seconds=600.0)
    assert (first.job_id, first.attempt + 1) == (second.job_id, second.attempt)
    store.save_checkpoint(second.job_id, second.attempt, agents[1], b"later")
    with pytest.raises(StoreError, match="later attempt"):
        store.save_checkpoint(first.job_id, first.attempt, agents[0], b"earlier")
    opened = store.open_checkpoint(first.job_id)
    assert opened is not None
    attempt, reader = opened
    with reader:
        assert (attempt, reader.size, reader.read(0, 100)) == (second.attempt, 5, b"later")
    assert store.open_checkpoint(10**9) is None
