"""The PostgreSQL backend alone: placeholders, row locks against a second connection,
ranged large-object writes, and connections lost to a restart, a termination and a
crash. Everything a Store does is in ../test_contract.py."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import psycopg
import pytest

from tests.pg import fresh_schema_url
from tests.server.store.support import enroll, lease, ok
from vcomp.errors import StoreError, StoreUnavailable
from vcomp.pgcluster import PostgresCluster
from vcomp.server.store import JobState, OutcomeKind, ResultSubmission
from vcomp.server.store.postgres import PostgresStore
from vcomp.server.store.postgres.database import pg_placeholders


@pytest.fixture
def url(pg_cluster: PostgresCluster) -> str:
    return fresh_schema_url(pg_cluster)


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    with PostgresStore(url, max_connections=4) as s:
        s.add_app("pi", "python", io.BytesIO(b"print('pi')"))
        yield s


def test_placeholders_become_psycopg_ones_outside_quotes() -> None:
    assert pg_placeholders("SELECT ?, ? FROM t") == "SELECT %s, %s FROM t"
    assert pg_placeholders("WHERE a = :now AND b > :now_2") == (
        "WHERE a = %(now)s AND b > %(now_2)s"
    )
    assert pg_placeholders("SELECT '?:x%', \"a?\", x::text, 5 % 2") == (
        "SELECT '?:x%', \"a?\", x::text, 5 %% 2"
    )
    assert pg_placeholders("SELECT 'it''s ?'") == "SELECT 'it''s ?'"


def test_the_lease_pick_skips_a_job_another_server_holds(store: PostgresStore, url: str) -> None:
    agent = enroll(store, "a")
    store.create_batch("pi", [b"1", b"2"])
    first = store.get_job_by_index(1, 0).job_id
    with psycopg.connect(url) as other:  # another server, mid-transaction on job 1
        other.execute("SELECT id FROM jobs WHERE id = %s FOR NO KEY UPDATE", (first,))
        got = lease(store, agent)
        assert got.index == 1  # job 1 is skipped, not waited for
        other.rollback()
    assert store.get_job(first).state is JobState.QUEUED
    assert lease(store, agent, now=1.0).index == 0


def test_expiry_takes_only_unlocked_jobs_and_is_idempotent(store: PostgresStore, url: str) -> None:
    agent = enroll(store, "a")
    store.create_batch("pi", [b"1", b"2"])
    held, free = lease(store, agent, seconds=10), lease(store, agent, seconds=10)
    with psycopg.connect(url) as other:  # another server is expiring job `held` now
        other.execute("SELECT id FROM jobs WHERE id = %s FOR NO KEY UPDATE", (held.job_id,))
        assert [e.job_id for e in store.expire_leases(20.0)] == [free.job_id]
        other.rollback()
    assert [e.job_id for e in store.expire_leases(20.0)] == [held.job_id]
    assert store.expire_leases(20.0) == []
    for job in (held, free):
        assert store.get_job(job.job_id).state is JobState.QUEUED
        assert [a.state.value for a in store.list_attempts(job.job_id)] == ["expired"]


def _large_objects(url: str) -> int:
    with psycopg.connect(url) as raw:
        row = raw.execute("SELECT COUNT(*) FROM pg_largeobject_metadata").fetchone()
        assert row is not None
        return int(row[0])


def test_a_staged_upload_is_written_in_ranges_into_one_large_object(
    store: PostgresStore, url: str
) -> None:
    agent = enroll(store, "a")
    store.create_batch("pi", [b"1"], output_bytes=1 << 20)
    got = lease(store, agent)
    before = _large_objects(url)
    payload = bytes(range(256)) * 2048  # 512 KiB
    handle = store.begin_result_upload(got.job_id, got.attempt, len(payload))
    assert _large_objects(url) == before + 1
    half = len(payload) // 2
    store.write_result_chunk(handle, half, payload[half:])  # out of order, in place
    store.write_result_chunk(handle, 0, payload[:half])
    digest = hashlib.sha256(payload).digest()
    store.finish_upload(handle, digest)
    sub = ResultSubmission(got.job_id, got.attempt, agent, upload=handle, output_sha256=digest)
    assert store.record_results([sub])[0].kind is OutcomeKind.ACCEPTED
    with store.open_output(got.job_id, got.attempt) as reader:
        assert reader.read(0, len(payload)) == payload
        assert reader.read(half - 3, 6) == payload[half - 3 : half + 3]
    # A discarded upload unlinks its large object in the same transaction.
    other = store.begin_result_upload(got.job_id, got.attempt, 10)
    assert _large_objects(url) == before + 2
    store.discard_upload(other)
    assert _large_objects(url) == before + 1


def test_a_restart_fails_one_transaction_then_the_pool_recovers() -> None:
    with PostgresCluster() as cluster:
        s = PostgresStore(cluster.url, max_connections=4)
        try:
            s.add_app("pi", "python", io.BytesIO(b""))
            agent = enroll(s, "a")
            s.create_batch("pi", [b"1", b"2"])
            got = lease(s, agent)
            s.record_results([ok(got)])
            cluster.restart("fast")
            with pytest.raises(StoreUnavailable, match="job store unavailable") as caught:
                s.get_job(got.job_id)  # the pooled connection died with the server
            assert cluster.url not in str(caught.value)
            assert s.get_job(got.job_id).state is JobState.DONE  # a fresh connection
            assert lease(s, agent).index == 1
            cluster.kill()  # a crash: committed work survives it
            with pytest.raises(StoreUnavailable):
                s.status()
            cluster.start()
            assert s.get_job(got.job_id).state is JobState.DONE
            assert s.list_results(got.job_id)[0].output_size == 2
        finally:
            s.close()


def test_a_terminated_backend_is_store_unavailable_and_other_errors_store_errors(
    store: PostgresStore, url: str
) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(StoreUnavailable):
        store.list_apps()
    assert [a.name for a in store.list_apps()] == ["pi"]
    with pytest.raises(StoreError) as caught, store.database.transaction() as conn:
        conn.execute("SELECT * FROM no_such_table")
    assert not isinstance(caught.value, StoreUnavailable)
    assert "no_such_table" in str(caught.value)
