"""GroupCommitter: results share commits, futures resolve only after their commit."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vcomp.errors import StoreError
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import JobState, Lease, OutcomeKind, ResultSubmission
from vcomp.server.store.sqlite import SqliteStore


def enroll(store: SqliteStore, name: str) -> str:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return store.enroll_agent(hashlib.sha256(der).hexdigest(), pem, name).agent_id


def lease_all(store: SqliteStore, agent: str, n: int) -> list[Lease]:
    store.create_batch("pi", [b"%d" % i for i in range(n)])
    leases = []
    while (got := store.lease_next(agent, 0.0, 600.0)) is not None:
        leases.append(got)
    assert len(leases) == n
    return leases


def result(lease: Lease) -> ResultSubmission:
    return ResultSubmission(lease.job_id, lease.attempt, lease.agent_id, output=b"%d" % lease.index)


async def test_500_concurrent_results_share_few_commits(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    agent = enroll(store, "a")
    leases = lease_all(store, agent, 500)
    visible_on_resolve: list[bool] = []

    async def submit(lease: Lease) -> OutcomeKind:
        outcome = await committer.submit_result(result(lease))
        # This check runs on the event loop thread, i.e. through a different SQLite
        # connection than the writer's: seeing the row proves the commit happened.
        visible_on_resolve.append(store.result_exists(lease.job_id, lease.attempt))
        return outcome.kind

    kinds = await asyncio.gather(*(submit(lease) for lease in leases))
    assert kinds == [OutcomeKind.ACCEPTED] * 500
    assert visible_on_resolve == [True] * 500
    assert committer.results_committed == 500
    assert committer.commits < 50, f"{committer.commits} commits for 500 results"
    assert committer.largest_group > 10
    assert store.status().jobs[JobState.DONE] == 500


async def test_leases_are_batched_and_distinct(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    agents = [enroll(store, f"a{i}") for i in range(60)]
    store.create_batch("pi", [b"%d" % i for i in range(50)])
    granted = await asyncio.gather(*(committer.lease(a, 0.0, 60.0) for a in agents))
    jobs = [g.job_id for g in granted if g is not None]
    assert len(jobs) == 50 and len(set(jobs)) == 50
    assert granted.count(None) == 10
    assert committer.commits < 60


async def test_one_bad_lease_request_fails_alone(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    good = enroll(store, "good")
    store.create_batch("pi", [b"x", b"y"])
    got = await asyncio.gather(
        committer.lease(good, 0.0, 60.0),
        committer.lease("ff" * 32, 0.0, 60.0),
        committer.lease(good, 0.0, 60.0),
        return_exceptions=True,
    )
    assert isinstance(got[0], Lease) and isinstance(got[2], Lease)
    assert isinstance(got[1], StoreError)


async def test_run_executes_on_the_writer_thread_after_earlier_work(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    agent = enroll(store, "a")
    [lease] = lease_all(store, agent, 1)
    pending = asyncio.ensure_future(committer.submit_result(result(lease)))
    await asyncio.sleep(0)  # let the submission reach the queue first
    seen = await committer.run(store.result_exists, lease.job_id, lease.attempt)
    thread = await committer.run(threading.get_ident)
    assert seen is True
    assert thread != threading.get_ident()
    assert (await pending).kind is OutcomeKind.ACCEPTED

    def boom() -> None:
        raise StoreError("nope")

    with pytest.raises(StoreError, match="nope"):
        await committer.run(boom)
    assert await committer.run(lambda: 7) == 7  # the thread survived


async def test_close_drains_everything_submitted(store: SqliteStore) -> None:
    agent = enroll(store, "a")
    leases = lease_all(store, agent, 200)
    committer = GroupCommitter(store)
    tasks = [asyncio.ensure_future(committer.submit_result(result(lease))) for lease in leases]
    await asyncio.sleep(0)  # every task has queued its request
    await committer.close()
    assert all(t.done() for t in tasks)
    assert [t.result().kind for t in tasks] == [OutcomeKind.ACCEPTED] * 200
    assert committer.results_committed == 200
    with pytest.raises(StoreError, match="closed"):
        await committer.submit_result(result(leases[0]))
    await committer.close()  # idempotent


async def test_cancelled_caller_does_not_break_the_group(
    store: SqliteStore, committer: GroupCommitter
) -> None:
    agent = enroll(store, "a")
    a, b = lease_all(store, agent, 2)
    doomed = asyncio.ensure_future(committer.submit_result(result(a)))
    await asyncio.sleep(0)
    doomed.cancel()
    outcome = await committer.submit_result(result(b))
    assert outcome.kind is OutcomeKind.ACCEPTED
    # The cancelled caller's result was still committed (its agent will resend and
    # get "duplicate", which is the idempotent path).
    await committer.run(lambda: None)
    assert store.result_exists(a.job_id, a.attempt)
