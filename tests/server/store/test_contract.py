"""The Store contract: every operation, against every backend (the ``store`` fixture).

A test here may use only the :class:`~vcomp.server.store.Store` interface and the
fixtures of ``conftest.py``; what one backend alone does lives in that backend's tests.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.server.store.conftest import RowCounter, StoreFactory
from tests.server.store.support import enroll, lease, new_agent_key, ok
from vcomp.errors import StoreError
from vcomp.protocol.capacity import JobCapacity
from vcomp.server.store import (
    DEFAULT_DISK_BYTES,
    REFUSAL_WINDOW,
    AppKind,
    AttemptState,
    CandidateResult,
    JobState,
    Lease,
    LeaseRequest,
    OutcomeKind,
    ResultSubmission,
    Store,
)
from vcomp.server.store.sql.leases import ORPHAN_REASON
from vcomp.server.store.sql.store import SqlStore

# --------------------------------------------------------------------------- apps


def test_app_versions_and_jobs_keep_their_version(store: Store, agents: list[str]) -> None:
    v1 = store.add_app("sim", AppKind.EXEC, io.BytesIO(b"one"))
    batch = store.create_batch("sim", [b"x"])
    v2 = store.add_app("sim", "exec", io.BytesIO(b"two!"))
    assert (v1.version, v2.version) == (1, 2)
    assert store.get_app("sim") == v2
    assert store.get_app("sim", 1) == v1
    assert store.get_app_by_id(v1.app_id) == v1
    assert [a.version for a in store.list_apps()] == [1, 2]
    assert v2.sha256 == hashlib.sha256(b"two!").digest() and v2.size == 4
    granted = lease(store, agents[0])
    assert granted.batch_id == batch and granted.app == v1
    assert store.read_code_chunk(granted.app.app_id, 0, 100) == b"one"


def test_app_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="kind"):
        store.add_app("x", "java", io.BytesIO(b""))
    with pytest.raises(StoreError, match="app name"):
        store.add_app("../evil", "python", io.BytesIO(b""))
    with pytest.raises(StoreError, match="unknown app"):
        store.get_app("missing")
    with pytest.raises(StoreError, match="cannot read"):
        store.add_app("x", "python", tmp_path / "missing.py")
    with pytest.raises(StoreError, match="ended after 3 of 10"):
        store.add_app("x", "python", io.BytesIO(b"abc"), size=10)
    with pytest.raises(StoreError, match="longer"):
        store.add_app("x", "python", io.BytesIO(b"abcdef"), size=3)
    assert store.list_apps() == []  # failed adds leave nothing behind


def test_big_code_blob_streams_in_and_out_in_chunks(store: Store, tmp_path: Path) -> None:
    size = 20 << 20
    rng = random.Random(7)
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // (1 << 20)):
            block = rng.randbytes(1 << 20)
            digest.update(block)
            f.write(block)

    tracemalloc.start()
    try:
        app = store.add_app("big", "exec", path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, f"add_app held {peak} bytes of Python memory"
    assert app.size == size and app.sha256 == digest.digest()

    # CODE-sized sequential chunks reassemble to the same bytes ...
    reread = hashlib.sha256()
    with store.open_code(app.app_id) as reader:
        assert reader.size == size and reader.sha256 == digest.digest()
        for offset in range(0, size, 1200):
            reread.update(reader.read(offset, 1200))
        assert reader.read(size, 1200) == b""
        with pytest.raises(StoreError):
            reader.read(size + 1, 1)
    assert reread.digest() == digest.digest()
    # ... and random ranges (retransmissions) match the file.
    with path.open("rb") as f, store.open_code(app.app_id) as reader:
        for _ in range(200):
            offset = rng.randrange(size)
            f.seek(offset)
            assert reader.read(offset, 1200) == f.read(1200)


# --------------------------------------------------------------------------- batches


def test_create_batch_validation(store: Store, app: str) -> None:
    with pytest.raises(StoreError, match="quorum"):
        store.create_batch(app, [b"x"], replicas=2, quorum=3)
    with pytest.raises(StoreError, match="at least one input"):
        store.create_batch(app, [])
    with pytest.raises(StoreError, match="not bytes"):
        store.create_batch(app, ["text"])  # type: ignore[list-item]
    with pytest.raises(StoreError, match="max_attempts"):
        store.create_batch(app, [b"x"], max_attempts=0)
    with pytest.raises(StoreError, match="cpu_seconds"):
        store.create_batch(app, [b"x"], cpu_seconds=float("nan"))
    with pytest.raises(StoreError, match="unknown app"):
        store.create_batch("nope", [b"x"])
    with pytest.raises(StoreError, match="unknown batch"):
        store.get_batch(12345)
    assert store.list_batches() == []


def test_batch_jobs_and_input_reads(store: Store, app: str) -> None:
    inputs = [f"input {i}".encode() * (i + 1) for i in range(5)]
    batch_id = store.create_batch(app, iter(inputs), replicas=3, quorum=2, max_attempts=2)
    batch = store.get_batch(batch_id)
    assert (batch.n_jobs, batch.replicas, batch.quorum, batch.attempt_budget) == (5, 3, 2, 6)
    for i, data in enumerate(inputs):
        job = store.get_job_by_index(batch_id, i)
        assert job.state is JobState.QUEUED and job.pending == 3
        assert job.input_sha256 == hashlib.sha256(data).digest()
        assert store.read_input_chunk(job.job_id, 0, 1 << 20) == data
        assert store.read_input_chunk(job.job_id, 3, 4) == data[3:7]
    with pytest.raises(StoreError, match="unknown job"):
        store.get_job(999)


# --------------------------------------------------------------------------- leasing


def test_lease_and_record_records_origin(store: Store, app: str, agents: list[str]) -> None:
    batch_id = store.create_batch(app, [b"a", b"b"], cpu_seconds=5, output_bytes=100)
    first = lease(store, agents[0], now=100.0, seconds=30.0)
    assert (first.index, first.attempt, first.deadline) == (0, 1, 130.0)
    assert first.limits.cpu_seconds == 5 and first.limits.output_bytes == 100
    assert store.get_job(first.job_id).state is JobState.LEASED
    [outcome] = store.record_results([ok(first, b"A", cpu_ms=12, wall_ms=34, received_at=101.0)])
    assert outcome.kind is OutcomeKind.ACCEPTED and outcome.durable
    assert outcome.job_state is JobState.DONE
    [stored] = store.list_results(first.job_id)
    assert (stored.agent_id, stored.attempt, stored.cpu_ms, stored.wall_ms) == (
        agents[0],
        1,
        12,
        34,
    )
    assert stored.received_at == 101.0 and stored.counted
    with store.open_output(first.job_id, 1) as reader:
        assert reader.read(0, 10) == b"A"
    [attempt] = store.list_attempts(first.job_id)
    assert attempt.state is AttemptState.SUCCEEDED and attempt.agent_id == agents[0]
    assert store.get_job(first.job_id).canonical_attempt == 1
    assert store.batch_status(batch_id).done == 1


def test_lease_none_when_nothing_queued_and_unknown_agent(
    store: Store, app: str, agents: list[str]
) -> None:
    assert store.lease_next(agents[0], 0.0, 10.0) is None
    store.create_batch(app, [b"x"])
    with pytest.raises(StoreError, match="unknown agent"):
        store.lease_next("ab" * 32, 0.0, 10.0)
    with pytest.raises(StoreError, match="lease_seconds"):
        store.lease_next(agents[0], 0.0, 0.0)
    assert store.get_job_by_index(1, 0).attempts == 0  # nothing half-done


def test_lease_many_serves_each_request_in_order(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"1", b"2", b"3"])
    got = store.lease_many([LeaseRequest(a, 0.0, 10.0) for a in agents])
    assert [g.index if g else None for g in got] == [0, 1, 2, None]


def test_expiry_requeues_then_max_attempts_fails_with_reason(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], max_attempts=3)
    for attempt in (1, 2, 3):
        # Two agents take turns: neither may use up the budget alone.
        holder = agents[(attempt - 1) % 2]
        granted = lease(store, holder, now=attempt * 100.0, seconds=10.0)
        assert granted.attempt == attempt
        assert store.expire_leases(attempt * 100.0 + 9.0) == []  # not yet
        [expired] = store.expire_leases(attempt * 100.0 + 10.0)
        assert (expired.job_id, expired.attempt) == (granted.job_id, attempt)
        expected = JobState.QUEUED if attempt < 3 else JobState.FAILED
        assert expired.job_state is expected
    job = store.get_job(granted.job_id)
    assert job.state is JobState.FAILED and job.attempts == 3
    assert job.reason is not None and "3 attempts" in job.reason and "lease expired" in job.reason
    assert store.lease_next(agents[0], 1000.0, 10.0) is None
    states = [a.state for a in store.list_attempts(job.job_id)]
    assert states == [AttemptState.EXPIRED] * 3


def test_release_requeues_at_once_and_counts(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], max_attempts=2)
    first = lease(store, agents[0])
    assert store.release_lease(first.job_id, first.attempt, "RESET by admin")
    assert not store.release_lease(first.job_id, first.attempt, "again")  # stale: no-op
    job = store.get_job(first.job_id)
    assert job.state is JobState.QUEUED and job.reason == "released: RESET by admin"
    assert store.lease_next(agents[0], 0.0, 30.0) is None  # its one charged attempt
    second = lease(store, agents[1])
    assert second.attempt == 2
    assert store.release_lease(second.job_id, 2, "transfer failed")
    job = store.get_job(first.job_id)
    assert job.state is JobState.FAILED and "transfer failed" in (job.reason or "")
    with pytest.raises(StoreError, match="no attempt 9"):
        store.release_lease(first.job_id, 9, "x")


# --------------------------------------------------------------------------- fit and refusals

MiB = 1 << 20


def test_lease_only_jobs_within_the_agents_capacity(
    store: Store, app: str, agents: list[str]
) -> None:
    big = store.create_batch(app, [b"b"], memory_bytes=512 * MiB)
    small = store.create_batch(app, [b"s"], memory_bytes=128 * MiB)
    fits = JobCapacity(memory_bytes=256 * MiB)
    (got,) = store.lease_many([LeaseRequest(agents[0], 0.0, 10.0, fits)])
    assert got is not None and got.batch_id == small  # the big job, first in line, is skipped
    assert store.lease_many([LeaseRequest(agents[0], 0.0, 10.0, fits)]) == [None]
    assert store.get_job_by_index(big, 0).state is JobState.QUEUED
    assert store.list_attempts(store.get_job_by_index(big, 0).job_id) == []
    # An agent without limits of its own takes it.
    assert lease(store, agents[1]).batch_id == big


@pytest.mark.parametrize(
    ("batch_limits", "too_small", "enough"),
    [
        ({"cpu_seconds": 61.5}, {"cpu_seconds": 60}, {"cpu_seconds": 61}),  # START sends 61
        ({"wall_seconds": 121.0}, {"wall_seconds": 120}, {"wall_seconds": 121}),
        ({"memory_bytes": MiB}, {"memory_bytes": MiB - 1}, {"memory_bytes": MiB}),
        ({"output_bytes": 2 * MiB}, {"output_bytes": MiB}, {"output_bytes": 2 * MiB}),
        ({"disk_bytes": 128 * MiB}, {"disk_bytes": 64 * MiB}, {"disk_bytes": 128 * MiB}),
        ({}, {"job_bytes": 13}, {"job_bytes": 14}),  # code 11 bytes + input 3 bytes
        ({}, {"kinds": ("exec",)}, {"kinds": ("python",)}),
    ],
)
def test_each_declared_maximum_filters_the_lease(
    store: Store,
    app: str,
    agents: list[str],
    batch_limits: dict[str, Any],
    too_small: dict[str, Any],
    enough: dict[str, Any],
) -> None:
    store.create_batch(app, [b"abc"], **batch_limits)
    request = LeaseRequest(agents[0], 0.0, 10.0, JobCapacity(**too_small))
    assert store.lease_many([request]) == [None]
    request = LeaseRequest(agents[0], 0.0, 10.0, JobCapacity(**enough))
    assert store.lease_many([request])[0] is not None


def test_the_one_fitting_job_behind_many_that_do_not_fit_is_found(
    store: Store, app: str, agents: list[str]
) -> None:
    """However a backend walks the queue (PostgreSQL: in growing windows of ids)."""
    store.create_batch(app, [b"x" * 100] * 500)
    small = store.create_batch(app, [b"y"])
    tight = LeaseRequest(agents[0], 0.0, 10.0, JobCapacity(job_bytes=len(b"print('pi')") + 1))
    [got] = store.lease_many([tight])
    assert got is not None and got.batch_id == small
    assert store.lease_many([tight]) == [None]  # and nothing else fits


def test_batch_disk_bytes_default_bound_and_lease(store: Store, app: str) -> None:
    default = store.create_batch(app, [b"x"])
    assert store.get_batch(default).limits.disk_bytes == DEFAULT_DISK_BYTES == 64 * MiB
    chosen = store.create_batch(app, [b"x"], disk_bytes=MiB)
    assert store.get_batch(chosen).limits.disk_bytes == MiB
    for bad in (0, -1, 1 << 63):
        with pytest.raises(StoreError, match="disk_bytes"):
            store.create_batch(app, [b"x"], disk_bytes=bad)


def test_a_refusal_costs_no_budget_and_is_not_offered_again(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], max_attempts=1)
    first = lease(store, agents[0])
    assert store.refuse_lease(first.job_id, first.attempt, agents[0], "too big", now=1.0) == 1
    job = store.get_job(first.job_id)
    assert job.state is JobState.QUEUED  # a budget of 1 would have failed it
    assert [a.state for a in store.list_attempts(job.job_id)] == [AttemptState.REFUSED]
    assert store.lease_next(agents[0], 2.0, 10.0) is None  # never to the refuser again
    second = lease(store, agents[1], now=2.0)
    assert second.attempt == 2
    store.record_results([ok(second)])
    assert store.get_job(job.job_id).state is JobState.DONE


def test_abandoned_costs_no_budget_and_comes_back(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], max_attempts=1)
    for n in range(1, 4):
        granted = lease(store, agents[0], now=float(n))
        count = store.refuse_lease(
            granted.job_id, granted.attempt, agents[0], "shutdown", now=float(n), offer_again=True
        )
        assert count == n
    job = store.get_job(granted.job_id)
    assert job.state is JobState.QUEUED
    assert {a.state for a in store.list_attempts(job.job_id)} == {AttemptState.ABANDONED}


def test_one_agent_cannot_use_up_a_jobs_budget_alone(
    store: Store, app: str, agents: list[str]
) -> None:
    """An agent gets at most max_attempts - 1 charged attempts of a job (errored,
    expired or released); then the job waits, queued, for another agent."""
    store.create_batch(app, [b"x"], max_attempts=3)
    first = lease(store, agents[0], now=1.0)
    store.record_results([ok(first, status="error", error="crashed")])
    second = lease(store, agents[0], now=2.0)
    assert store.release_lease(second.job_id, second.attempt, "transfer failed", now=3.0)
    assert store.lease_next(agents[0], 4.0, 10.0) is None  # two charged: no third
    assert store.get_job(first.job_id).state is JobState.QUEUED
    third = lease(store, agents[1], now=5.0)
    assert third.attempt == 3
    store.record_results([ok(third)])
    assert store.get_job(first.job_id).state is JobState.DONE


def test_an_expired_lease_counts_against_its_agent(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], max_attempts=2)
    first = lease(store, agents[0], now=1.0)
    store.expire_leases(now=100.0)
    assert store.lease_next(agents[0], 101.0, 10.0) is None
    job = store.get_job(first.job_id)
    assert job.state is JobState.QUEUED
    assert lease(store, agents[1], now=102.0).attempt == 2


def test_leases_of_a_silent_server_are_released_once(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"a", b"b", b"c"], max_attempts=3)
    store.server_alive("server-a", "192.0.2.1:7461", 1000.0)
    store.server_alive("server-b", "192.0.2.2:7461", 1000.0)
    by_a, by_b = store.lease_many(
        [
            LeaseRequest(agents[0], 1000.0, 600.0, server_id="server-a"),
            LeaseRequest(agents[1], 1000.0, 600.0, server_id="server-b"),
        ]
    )
    by_cli = lease(store, agents[2], now=1000.0)  # no server: only expiry ends it
    assert by_a is not None and by_b is not None
    store.server_alive("server-b", "192.0.2.2:7461", 1060.0)  # a goes silent
    assert store.release_orphaned_leases(1060.0, silent_since=1000.0) == []  # not yet
    [released] = store.release_orphaned_leases(1061.0, silent_since=1030.0)
    assert (released.job_id, released.attempt, released.agent_id) == (
        by_a.job_id,
        by_a.attempt,
        agents[0],
    )
    assert store.release_orphaned_leases(1062.0, silent_since=1030.0) == []  # once
    [attempt] = store.list_attempts(by_a.job_id)
    assert (attempt.state, attempt.reason) == (AttemptState.RELEASED, ORPHAN_REASON)
    assert store.get_job(by_a.job_id).state is JobState.QUEUED
    for live in (by_b, by_cli):
        assert store.list_attempts(live.job_id)[0].state is AttemptState.LEASED
    assert [(s[0], s[1]) for s in store.list_servers()] == [
        ("server-a", "192.0.2.1:7461"),
        ("server-b", "192.0.2.2:7461"),
    ]
    # The job goes to another agent at once, like an expired lease (not a refusal).
    assert lease(store, agents[3], now=1063.0).job_id == by_a.job_id


def test_only_the_holder_refuses_its_live_lease(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], max_attempts=1)
    granted = lease(store, agents[0])
    assert store.refuse_lease(granted.job_id, granted.attempt, agents[1], "x", now=1.0) is None
    assert store.list_attempts(granted.job_id)[0].state is AttemptState.LEASED
    store.record_results([ok(granted)])
    # A refusal of a lease that already ended changes nothing.
    assert store.refuse_lease(granted.job_id, granted.attempt, agents[0], "x", now=2.0) is None
    assert store.get_job(granted.job_id).state is JobState.DONE
    with pytest.raises(StoreError, match="no attempt 9"):
        store.refuse_lease(granted.job_id, 9, agents[0], "x", now=2.0)


def test_refusals_past_the_cap_stop_leases_for_the_window(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"%d" % i for i in range(10)])
    cap = 3
    for n in range(cap):
        (granted,) = store.lease_many([LeaseRequest(agents[0], float(n), 10.0, refusal_cap=cap)])
        assert granted is not None
        store.refuse_lease(granted.job_id, granted.attempt, agents[0], "no", now=float(n))
    benched = LeaseRequest(agents[0], float(cap), 10.0, refusal_cap=cap)
    assert store.lease_many([benched]) == [None]
    # Other agents are not affected; the first refusal leaves the window an hour later.
    assert lease(store, agents[1], now=float(cap)) is not None
    later = LeaseRequest(agents[0], REFUSAL_WINDOW + 0.5, 10.0, refusal_cap=cap)
    assert store.lease_many([later])[0] is not None


def test_renew_extends_only_the_live_lease(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"])
    first = lease(store, agents[0], now=0.0, seconds=10.0)
    assert store.renew_lease(first.job_id, 1, 8.0, 10.0) == 18.0
    assert store.expire_leases(15.0) == []  # the renewal held
    assert len(store.expire_leases(18.0)) == 1
    second = lease(store, agents[1], now=20.0, seconds=10.0)
    assert store.renew_lease(first.job_id, 1, 21.0, 10.0) is None  # stale attempt
    assert store.list_attempts(first.job_id)[1].deadline == 30.0  # untouched
    store.record_results([ok(second)])
    assert store.renew_lease(second.job_id, 2, 22.0, 10.0) is None  # job done


def test_renewals_stop_at_the_hard_deadline(store: Store, app: str, agents: list[str]) -> None:
    """However often it is renewed, a lease ends lease + wall + transfer after it began."""
    store.create_batch(app, [b"x"], wall_seconds=20, max_attempts=2)
    first = lease(store, agents[0], now=0.0, seconds=10.0)
    hard = 0.0 + 10.0 + 20.0 + 5.0
    now = 0.0
    while now < 40.0:
        now += 3.0
        deadline = store.renew_lease(first.job_id, 1, now, 10.0, transfer_seconds=5.0)
        assert deadline == min(now + 10.0, hard)
        if deadline <= now:
            break
    assert store.expire_leases(hard - 0.1) == []
    (expired,) = store.expire_leases(hard)
    assert (expired.job_id, expired.job_state) == (first.job_id, JobState.QUEUED)
    assert store.renew_lease(first.job_id, 1, hard + 1, 10.0, transfer_seconds=5.0) is None


def test_attempt_owner(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], output_bytes=1234)
    first = lease(store, agents[0])
    assert store.attempt_owner(first.job_id, 1) == (agents[0], 1234)
    assert store.attempt_owner(first.job_id, 2) is None
    assert store.attempt_owner(2**64 - 1, 1) is None  # a wire id SQLite cannot hold


def test_replicas_go_to_distinct_agents(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], replicas=3, quorum=2)
    a0 = lease(store, agents[0])
    assert store.lease_next(agents[0], 0.0, 10.0) is None  # never two replicas to one agent
    a1 = lease(store, agents[1])
    a2 = lease(store, agents[2])
    assert {a0.agent_id, a1.agent_id, a2.agent_id} == set(agents[:3])
    assert (a0.attempt, a1.attempt, a2.attempt) == (1, 2, 3)
    assert store.get_job(a0.job_id).state is JobState.LEASED
    assert store.lease_next(agents[3], 0.0, 10.0) is None  # all slots out
    # An agent whose replica expired may take the job again; one with a result may not.
    store.record_results([ok(a1)])
    store.expire_leases(1000.0)
    again = store.lease_many([LeaseRequest(a, 1000.0, 10.0) for a in agents])
    assert agents[1] not in {g.agent_id for g in again if g}


# --------------------------------------------------------------------------- replication


def test_quorum_agreement_picks_canonical(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], replicas=3, quorum=2)
    r = [lease(store, a) for a in agents[:3]]
    [o1] = store.record_results([ok(r[0], b"same")])
    assert o1.job_state is JobState.LEASED
    [o2] = store.record_results([ok(r[1], b"same")])
    assert o2.job_state is JobState.DONE
    job = store.get_job(r[0].job_id)
    assert job.canonical_attempt == r[0].attempt and job.disagreements == 0
    # The third replica arrives after the decision: kept as evidence, changes nothing.
    [o3] = store.record_results([ok(r[2], b"different")])
    assert o3.kind is OutcomeKind.EVIDENCE and o3.durable
    assert store.get_job(r[0].job_id).canonical_attempt == r[0].attempt
    assert not store.list_results(r[0].job_id)[2].counted


def test_disagreement_is_recorded_and_more_replicas_issued(
    store: Store, app: str, agents: list[str]
) -> None:
    batch_id = store.create_batch(app, [b"x"], replicas=2, quorum=2, max_attempts=2)
    r0, r1 = lease(store, agents[0]), lease(store, agents[1])
    store.record_results([ok(r0, b"honest")])
    [outcome] = store.record_results([ok(r1, b"forged")])
    assert outcome.job_state is JobState.QUEUED  # a tie-breaker is wanted
    job = store.get_job(r0.job_id)
    assert job.disagreements == 1 and job.pending == 1
    assert store.lease_next(agents[0], 0.0, 10.0) is None  # both already answered
    r2 = lease(store, agents[2])
    [outcome] = store.record_results([ok(r2, b"honest")])
    assert outcome.job_state is JobState.DONE
    job = store.get_job(r0.job_id)
    assert job.canonical_attempt == r0.attempt
    [record] = store.iter_results(batch_id)
    assert record.result is not None and record.result.agent_id == agents[0]
    assert store.batch_status(batch_id).disagreements == 1


def test_disagreement_until_budget_runs_out_fails(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], replicas=2, quorum=2, max_attempts=1)
    r0, r1 = lease(store, agents[0]), lease(store, agents[1])
    store.record_results([ok(r0, b"one"), ok(r1, b"two")])
    job = store.get_job(r0.job_id)
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith("no quorum")
    assert job.disagreements == 1


def test_custom_comparator(make_store: StoreFactory) -> None:
    def close_enough(a: CandidateResult, b: CandidateResult) -> bool:
        return abs(float(a.read()) - float(b.read())) < 0.01

    with make_store(comparator=close_enough) as s:
        s.add_app("pi", "python", io.BytesIO(b""))
        a, b = enroll(s, "a"), enroll(s, "b")
        s.create_batch("pi", [b"x"], replicas=2)
        la, lb = lease(s, a), lease(s, b)
        s.record_results([ok(la, b"3.1415"), ok(lb, b"3.1422")])
        assert s.get_job(la.job_id).state is JobState.DONE


# --------------------------------------------------------------------------- results


def test_duplicate_result_is_recorded_once(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"])
    granted = lease(store, agents[0])
    first, second = store.record_results([ok(granted), ok(granted)])
    assert first.kind is OutcomeKind.ACCEPTED
    assert second.kind is OutcomeKind.DUPLICATE and second.durable
    [third] = store.record_results([ok(granted, b"other")])
    assert third.kind is OutcomeKind.DUPLICATE
    assert len(store.list_results(granted.job_id)) == 1


def test_stale_attempt_never_overwrites_the_winner(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"])
    old = lease(store, agents[0], now=0.0, seconds=10.0)
    store.expire_leases(10.0)
    new = lease(store, agents[1], now=11.0, seconds=10.0)  # reassigned
    [stale] = store.record_results([ok(old, b"late")])
    assert stale.kind is OutcomeKind.EVIDENCE and stale.job_state is JobState.LEASED
    assert store.get_job(old.job_id).state is JobState.LEASED
    [fresh] = store.record_results([ok(new, b"fresh")])
    assert fresh.kind is OutcomeKind.ACCEPTED and fresh.job_state is JobState.DONE
    assert store.get_job(old.job_id).canonical_attempt == new.attempt
    assert not store.release_lease(old.job_id, old.attempt, "x")
    results = {r.attempt: r.counted for r in store.list_results(old.job_id)}
    assert results == {old.attempt: False, new.attempt: True}


def test_late_result_counts_if_job_not_yet_reassigned(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"])
    old = lease(store, agents[0], now=0.0, seconds=10.0)
    store.expire_leases(10.0)  # requeued, nobody took it yet
    [late] = store.record_results([ok(old)])
    assert late.kind is OutcomeKind.LATE and late.job_state is JobState.DONE
    assert store.lease_next(agents[1], 11.0, 10.0) is None


def test_error_status_requeues_then_fails_with_reason(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], max_attempts=2)
    first = lease(store, agents[0])
    [o] = store.record_results([ResultSubmission(first.job_id, 1, agents[0], "crashed", error="x")])
    assert o.kind is OutcomeKind.ACCEPTED and o.job_state is JobState.QUEUED
    second = lease(store, agents[1])
    [o] = store.record_results(
        [ResultSubmission(second.job_id, 2, agents[1], "timeout", error="wall clock 120 s")]
    )
    assert o.job_state is JobState.FAILED
    job = store.get_job(first.job_id)
    assert job.reason is not None and "timeout: wall clock 120 s" in job.reason
    assert [a.state for a in store.list_attempts(job.job_id)] == [AttemptState.ERRORED] * 2


def test_control_characters_in_an_error_are_kept_and_in_a_status_rejected(
    store: Store, app: str, agents: list[str]
) -> None:
    """Every backend alike (PostgreSQL text holds no NUL): an agent's error text is
    kept with a NUL replaced; a status is a word, so one with a NUL is refused."""
    store.create_batch(app, [b"x", b"y"])
    first, second = lease(store, agents[0]), lease(store, agents[0])
    bad_status = ResultSubmission(first.job_id, first.attempt, agents[0], "ok\x00", error="")
    nul_error = ResultSubmission(
        second.job_id, second.attempt, agents[0], "crashed", error="a\x00b"
    )
    o1, o2 = store.record_results([bad_status, nul_error])
    assert o1.kind is OutcomeKind.REJECTED and "printable" in o1.detail
    assert o2.kind is OutcomeKind.ACCEPTED
    [stored] = store.list_results(second.job_id)
    assert stored.error == "a\ufffdb"


# A constraint the database enforces on one result (a real failing statement).
_REFUSE_CPU_4242 = {
    "sqlite": (
        "CREATE TRIGGER refuse_4242 BEFORE INSERT ON results WHEN NEW.cpu_ms = 4242 "
        "BEGIN SELECT RAISE(ABORT, 'cpu_ms 4242 refused'); END",
    ),
    "postgresql": (
        "CREATE FUNCTION refuse_4242() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.cpu_ms = 4242 THEN RAISE check_violation USING MESSAGE = 'cpu_ms 4242 refused'; "
        "END IF; RETURN NEW; END $$",
        "CREATE TRIGGER refuse_4242 BEFORE INSERT ON results FOR EACH ROW "
        "EXECUTE FUNCTION refuse_4242()",
    ),
}


def test_a_statement_failing_mid_group_rejects_only_its_result(
    store: Store, app: str, agents: list[str], backend: str, count_rows: RowCounter
) -> None:
    """A group runs under one savepoint; a statement that fails in it undoes the group,
    which runs again result by result: the others are recorded once each, with their
    outputs and settled jobs, and the failed one leaves nothing behind."""
    assert isinstance(store, SqlStore)
    with store.database.transaction(write=True) as conn:
        for statement in _REFUSE_CPU_4242[backend]:
            conn.execute(statement)
    store.create_batch(app, [b"x", b"y", b"z"])
    first, second, third = (lease(store, agents[0]) for _ in range(3))
    blobs_before = count_rows("blobs")
    refused = replace(ok(second), cpu_ms=4242)
    o1, o2, o3 = store.record_results([ok(first), refused, ok(third)])
    assert (o1.kind, o2.kind, o3.kind) == (
        OutcomeKind.ACCEPTED,
        OutcomeKind.REJECTED,
        OutcomeKind.ACCEPTED,
    )
    assert "4242 refused" in o2.detail
    assert count_rows("results") == 2
    assert count_rows("blobs") == blobs_before + 2  # the two outputs, no orphan
    states = [store.get_job(g.job_id).state for g in (first, second, third)]
    assert states == [JobState.DONE, JobState.LEASED, JobState.DONE]
    assert [a.state for a in store.list_attempts(first.job_id)] == [AttemptState.SUCCEEDED]
    assert [a.state for a in store.list_attempts(second.job_id)] == [AttemptState.LEASED]
    [again] = store.record_results([ok(second)])
    assert again.kind is OutcomeKind.ACCEPTED and again.job_state is JobState.DONE


def test_a_second_result_for_a_job_in_one_group_sees_the_first(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    """A group's attempts are read once up front; a job's second result in the group
    must see what the first did: here the first settles the job (quorum 1), so the
    second is kept as evidence, not counted."""
    store.create_batch(app, [b"x"], replicas=2, quorum=1)
    a, b = lease(store, agents[0]), lease(store, agents[1])
    assert a.job_id == b.job_id
    first, second = store.record_results([ok(a), ok(b, b"other")])
    assert first.kind is OutcomeKind.ACCEPTED and first.job_state is JobState.DONE
    assert second.job_state is JobState.DONE and "kept as evidence" in second.detail
    assert count_rows("results", "counted = 1") == 1
    assert store.get_job(a.job_id).canonical_attempt == a.attempt


def test_wrong_agent_and_unknown_attempt_are_rejected(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"])
    granted = lease(store, agents[0])
    impostor = ResultSubmission(granted.job_id, granted.attempt, agents[1], output=b"x")
    unknown = ResultSubmission(granted.job_id, 7, agents[0], output=b"x")
    both = ResultSubmission(granted.job_id, 1, agents[0], output=b"x", upload=None, cpu_ms=-1)
    o1, o2, o3, o4 = store.record_results([impostor, unknown, both, ok(granted)])
    assert (o1.kind, o2.kind, o3.kind) == (OutcomeKind.REJECTED,) * 3
    assert not o1.durable and "another agent" in o1.detail
    assert "no attempt 7" in o2.detail and "cpu_ms" in o3.detail
    assert o4.kind is OutcomeKind.ACCEPTED  # the bad neighbours did not spoil the group


def test_inline_output_over_the_limit_fails_the_attempt(
    store: Store, app: str, agents: list[str]
) -> None:
    store.create_batch(app, [b"x"], output_bytes=4, max_attempts=1)
    granted = lease(store, agents[0])
    [o] = store.record_results([ok(granted, b"12345")])
    assert o.kind is OutcomeKind.ACCEPTED and o.job_state is JobState.FAILED
    [stored] = store.list_results(granted.job_id)
    assert stored.status == "output_too_large"
    with store.open_output(granted.job_id, granted.attempt) as reader:
        assert reader.read(0, 100) == b""  # not kept


def test_inline_checksum_mismatch_is_rejected(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"])
    granted = lease(store, agents[0])
    [o] = store.record_results([ok(granted, b"abc", output_sha256=b"\0" * 32)])
    assert o.kind is OutcomeKind.REJECTED and "sha256" in o.detail
    assert not store.result_exists(granted.job_id, granted.attempt)


# --------------------------------------------------------------------------- staged uploads


def staged(store: Store, granted: Lease, data: bytes, chunk: int = 1200) -> ResultSubmission:
    handle = store.begin_result_upload(granted.job_id, granted.attempt, len(data))
    for offset in range(0, len(data), chunk):
        store.write_result_chunk(handle, offset, memoryview(data)[offset : offset + chunk])
    return ResultSubmission(
        granted.job_id,
        granted.attempt,
        granted.agent_id,
        upload=handle,
        output_size=len(data),
        output_sha256=hashlib.sha256(data).digest(),
    )


def test_staged_upload_round_trip(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    store.create_batch(app, [b"x"], output_bytes=8 << 20)
    granted = lease(store, agents[0])
    data = random.Random(1).randbytes(3 << 20)
    sub = staged(store, granted, data, chunk=64 << 10)
    [o] = store.record_results([sub])
    assert o.kind is OutcomeKind.ACCEPTED and o.job_state is JobState.DONE
    [stored] = store.list_results(granted.job_id)
    assert stored.output_size == len(data)
    assert stored.output_sha256 == hashlib.sha256(data).digest()
    with store.open_output(granted.job_id, granted.attempt) as reader:
        got = b"".join(reader.read(off, 1 << 20) for off in range(0, len(data), 1 << 20))
    assert got == data
    # The handle is spent; a resend of the same result is a duplicate.
    with pytest.raises(StoreError, match="unknown or finished upload"):
        store.write_result_chunk(sub.upload, 0, b"x")  # type: ignore[arg-type]
    [again] = store.record_results([staged(store, granted, data, chunk=1 << 20)])
    assert again.kind is OutcomeKind.DUPLICATE
    assert count_rows("uploads") == 0


def test_staged_upload_checks_sha_size_and_completeness(
    store: Store, app: str, agents: list[str], count_rows: RowCounter
) -> None:
    store.create_batch(app, [b"x"], output_bytes=1 << 20)
    granted = lease(store, agents[0])
    data = b"result!" * 1000

    bad_sha = replace(staged(store, granted, data), output_sha256=b"\1" * 32)
    bad_size = replace(staged(store, granted, data), output_size=len(data) + 1)
    handle = store.begin_result_upload(granted.job_id, granted.attempt, len(data))
    store.write_result_chunk(handle, 0, data[:100])
    incomplete = ResultSubmission(
        granted.job_id, granted.attempt, agents[0], upload=handle,
        output_sha256=hashlib.sha256(data).digest(),
    )  # fmt: skip
    outcomes = store.record_results([bad_sha, bad_size, incomplete])
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECTED] * 3
    assert "sha256 mismatch" in outcomes[0].detail
    assert "size mismatch" in outcomes[1].detail
    assert "incomplete" in outcomes[2].detail
    assert not store.result_exists(granted.job_id, granted.attempt)
    assert count_rows("uploads") == 0  # discarded
    assert count_rows("blobs", "sha256 IS NULL") == 0
    [good] = store.record_results([staged(store, granted, data)])
    assert good.kind is OutcomeKind.ACCEPTED


def test_finish_upload_hashes_before_the_commit(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], output_bytes=1 << 20)
    granted = lease(store, agents[0])
    data = random.Random(2).randbytes(300_000)
    sub = staged(store, granted, data)
    assert sub.upload is not None and sub.output_sha256 is not None
    store.finish_upload(sub.upload, sub.output_sha256)
    with pytest.raises(StoreError, match="already finished"):
        store.write_result_chunk(sub.upload, 0, b"x")  # sealed bytes cannot change
    [o] = store.record_results([sub])
    assert o.kind is OutcomeKind.ACCEPTED
    with store.open_output(granted.job_id, granted.attempt) as reader:
        assert reader.read(1000, 5000) == data[1000:6000]

    store.create_batch(app, [b"y"], output_bytes=1 << 20)
    other = lease(store, agents[1])
    bad = staged(store, other, data)
    assert bad.upload is not None
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.finish_upload(bad.upload, b"\0" * 32)
    with pytest.raises(StoreError, match="unknown or finished"):
        store.finish_upload(bad.upload, hashlib.sha256(data).digest())  # discarded
    half = store.begin_result_upload(other.job_id, other.attempt, 10)
    store.write_result_chunk(half, 0, b"12345")
    with pytest.raises(StoreError, match="incomplete"):
        store.finish_upload(half, b"\0" * 32)


def test_upload_bounds(store: Store, app: str, agents: list[str]) -> None:
    store.create_batch(app, [b"x"], output_bytes=1000)
    granted = lease(store, agents[0])
    with pytest.raises(StoreError, match="exceeds the job's limit"):
        store.begin_result_upload(granted.job_id, granted.attempt, 1001)
    with pytest.raises(StoreError, match="no attempt"):
        store.begin_result_upload(granted.job_id, 5, 10)
    handle = store.begin_result_upload(granted.job_id, granted.attempt, 10)
    with pytest.raises(StoreError, match="outside"):
        store.write_result_chunk(handle, 8, b"abc")
    with pytest.raises(StoreError, match="outside"):
        store.write_result_chunk(handle, -1, b"a")
    store.discard_upload(handle)
    with pytest.raises(StoreError, match="unknown or finished"):
        store.write_result_chunk(handle, 0, b"a")
    leftover = store.begin_result_upload(granted.job_id, granted.attempt, 10)
    assert store.discard_stale_uploads(before=0.0) == 0
    assert store.discard_stale_uploads(before=float("inf")) == 1
    with pytest.raises(StoreError, match="unknown or finished"):
        store.write_result_chunk(leftover, 0, b"a")


# --------------------------------------------------------------------------- agents & misc


def test_agents(store: Store) -> None:
    agent_id, pem = new_agent_key()
    record = store.enroll_agent(agent_id.upper(), pem, "lab-1")
    assert record.agent_id == agent_id and record.name == "lab-1"
    assert store.enroll_agent(agent_id, pem, "lab-renamed").name == "lab-renamed"
    other_id, other_pem = new_agent_key()
    with pytest.raises(StoreError, match="SHA-256"):
        store.enroll_agent(other_id, pem, "liar")
    with pytest.raises(StoreError, match="PEM"):
        store.enroll_agent(other_id, "not a key", "x")
    with pytest.raises(StoreError, match="64 hex"):
        store.enroll_agent("abc", other_pem, "x")
    assert [a.agent_id for a in store.list_agents()] == [agent_id]
    assert store.find_agent(other_id) is None
    with pytest.raises(StoreError, match="unknown agent"):
        store.get_agent(other_id)

    assert store.get_agent_clock(agent_id) is None
    store.set_agent_clock(agent_id, (1 << 64) - 5, 3, 4)
    clock = store.get_agent_clock(agent_id)
    assert clock is not None and (clock.clock, clock.reset_count, clock.restart_count) == (
        (1 << 64) - 5,
        3,
        4,
    )
    with pytest.raises(StoreError, match="unknown agent"):
        store.set_agent_clock(other_id, 1, 0, 0)
    store.touch_agent(agent_id, 123.0, "10.0.0.7:4000")
    seen = store.get_agent(agent_id)
    assert (seen.last_seen, seen.address) == (123.0, "10.0.0.7:4000")


def test_measurement_allowlist(store: Store) -> None:
    m = store.allow_measurement("sha256:17=aa;18=bb", "release 0.1")
    assert store.is_measurement_allowed(m.text)
    store.allow_measurement("sha256:17=aa;18=bb", "renamed")
    assert [(x.text, x.note) for x in store.list_measurements()] == [(m.text, "renamed")]
    store.remove_measurement(m.text)
    assert not store.is_measurement_allowed(m.text)
    with pytest.raises(StoreError, match="no such measurement"):
        store.remove_measurement(m.text)
    with pytest.raises(StoreError, match="non-empty"):
        store.allow_measurement("  ")


def test_reset_requests_are_seen_by_every_poller(store: Store, agents: list[str]) -> None:
    start = store.newest_reset_request()
    store.request_reset(agents[1])
    store.request_reset(agents[0])
    seen = store.reset_requests_after(start)
    assert [agent for _, agent in seen] == [agents[1], agents[0]]
    # a second server polling from the same point sees the same requests
    assert store.reset_requests_after(start) == seen
    assert store.reset_requests_after(seen[-1][0]) == []
    assert store.newest_reset_request() == seen[-1][0]
    with pytest.raises(StoreError, match="unknown agent"):
        store.request_reset("00" * 32)


def test_pruned_reset_requests_never_reuse_an_id(make_store: StoreFactory) -> None:
    clock = [1000.0]
    store = make_store(clock=lambda: clock[0])
    agents = [enroll(store, f"agent-{i}") for i in range(2)]
    store.request_reset(agents[0])
    store.request_reset(agents[1])
    newest = store.newest_reset_request()
    clock[0] += 1000
    assert store.prune_reset_requests(clock[0]) == 1  # the newest row stays
    store.request_reset(agents[0])
    fresh = store.reset_requests_after(newest)
    assert [agent for _, agent in fresh] == [agents[0]] and fresh[0][0] > newest


def test_queued_by_app_counts_only_queued_jobs_per_app(
    store: Store, app: str, agents: list[str]
) -> None:
    assert store.queued_by_app() == {app: 0}  # registered, nothing submitted yet
    store.add_app("echo", "python", io.BytesIO(b"print('echo')"))
    store.create_batch(app, [b"a", b"b", b"c"], max_attempts=1)
    store.create_batch("echo", [b"x"], max_attempts=1)
    store.create_batch(app, [b"d"], max_attempts=1)
    assert store.queued_by_app() == {app: 4, "echo": 1}
    leased = [lease(store, a) for a in agents[:2]]  # lowest ids first: two of the first batch
    assert store.queued_by_app() == {app: 2, "echo": 1}
    store.record_results([ok(leased[0], b"done")])
    assert store.queued_by_app() == {app: 2, "echo": 1}  # done is not queued either
    while store.lease_next(agents[2], 0.0, 30.0) is not None:
        pass
    assert store.queued_by_app() == {app: 0, "echo": 0}  # run dry: still there, at 0


def test_queued_by_app_leaves_out_retired_apps_only_once_nothing_of_them_waits(
    store: Store, app: str
) -> None:
    store.add_app(app, "python", io.BytesIO(b"print('pi v2')"))
    store.retire_app(app, 1)
    assert store.queued_by_app() == {app: 0}  # v2 is still live
    store.add_app("old", "python", io.BytesIO(b"print('old')"))
    batch = store.create_batch("old", [b"a", b"b"], max_attempts=1)
    store.retire_app("old", 1)
    assert store.queued_by_app() == {app: 0, "old": 2}  # retired, but its batch runs on
    store.cancel_batch(batch)
    assert store.queued_by_app() == {app: 0}


def test_recent_failures_lists_failed_jobs_newest_first_with_their_reason(
    store: Store, app: str, agents: list[str]
) -> None:
    assert store.recent_failures(10) == []
    batch = store.create_batch(app, [b"a", b"b", b"c"], max_attempts=1)
    first, second, third = (lease(store, a) for a in agents[:3])
    store.record_results(
        [
            ResultSubmission(first.job_id, 1, agents[0], "crashed", error="<b>boom</b>"),
            ok(second, b"fine"),
            ResultSubmission(third.job_id, 1, agents[2], "timeout", error="wall clock 9 s"),
        ]
    )
    failures = store.recent_failures(10)
    assert [(f.batch_id, f.index) for f in failures] == [(batch, 2), (batch, 0)]
    assert "wall clock 9 s" in failures[0].reason and "<b>boom</b>" in failures[1].reason
    assert failures[0].finished_at is not None
    assert [f.index for f in store.recent_failures(1)] == [2]
    for bad in (0, -1, 1001):
        with pytest.raises(StoreError, match="limit"):
            store.recent_failures(bad)


def test_status_and_iter_results(store: Store, app: str, agents: list[str]) -> None:
    batch_id = store.create_batch(app, [b"a", b"b", b"c"], max_attempts=1)
    l0, l1, _ = (lease(store, a) for a in agents[:3])
    store.record_results([ok(l0, b"zero")])
    store.release_lease(l1.job_id, l1.attempt, "gone")
    status = store.status()
    assert status.agents == 4
    assert status.jobs == {
        JobState.QUEUED: 0,
        JobState.LEASED: 1,
        JobState.DONE: 1,
        JobState.FAILED: 1,
    }
    [batch] = status.batches
    assert (batch.total, batch.done, batch.failed, batch.leased) == (3, 1, 1, 1)
    assert not batch.finished and batch.app_name == app
    records = list(store.iter_results(batch_id))
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].result is not None and records[0].result.output_size == 4
    assert records[0].input_sha256 == hashlib.sha256(b"a").digest()
    assert records[1].state is JobState.FAILED and records[1].result is None
    assert "gone" in (records[1].reason or "")
    with pytest.raises(StoreError, match="unknown batch"):
        list(store.iter_results(99))


def test_iter_results_pages_through_large_batches(store: Store, app: str) -> None:
    batch_id = store.create_batch(app, (str(i).encode() for i in range(700)))
    assert [r.index for r in store.iter_results(batch_id)] == list(range(700))


def test_batch_deadline_fails_unfinished_jobs(store: Store, app: str, agents: list[str]) -> None:
    batch_id = store.create_batch(app, [b"a", b"b"], deadline=50.0)
    lease(store, agents[0], now=10.0)
    assert store.lease_next(agents[1], 50.0, 10.0) is None  # past the deadline
    store.expire_leases(50.0)
    status = store.batch_status(batch_id)
    assert status.failed == 2 and status.finished
    assert store.get_job_by_index(batch_id, 1).reason == "batch deadline passed"


def test_threads_never_double_lease(make_store: StoreFactory) -> None:
    store = make_store()
    store.add_app("pi", "python", io.BytesIO(b""))
    workers = [enroll(store, f"w{i}") for i in range(4)]
    store.create_batch("pi", [b"%d" % i for i in range(200)])
    granted: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(agent: str) -> None:
        while (got := store.lease_next(agent, 0.0, 60.0)) is not None:
            store.record_results([ok(got)])
            with lock:
                granted.append((got.job_id, got.attempt))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 200 and len(set(granted)) == 200
    assert store.status().jobs[JobState.DONE] == 200
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_app("pi")
