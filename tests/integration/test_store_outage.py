"""A store outage mid-batch: another process holds SQLite's write lock for seconds.

The server must ride it out: keep every session, lease nothing while the store is
away, ACK no result before it is committed, keep the results that could not be
committed and record them once the store is back, renew (not expire) the leases of
agents that kept working, and log the outage once each way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from tests.integration.conftest import (
    Lab,
    LogRecorder,
    assert_results_unique,
    python_job,
    wait_until,
)
from tests.sqlite_lock import HeldLock

SLEEPER = python_job(
    "job = json.loads(data)\n"
    "time.sleep(job['sleep'])\n"
    "return hashlib.sha256(data).hexdigest().encode() * job.get('repeat', 1)"
)
BIG = 10_000  # 640 kB: staged in the store as it arrives, not committed inline
LONG, SHORT = 20.0, 0.2  # the long jobs run through the outage and past the return
AGENTS = 3  # with two workers each: three run the long jobs, three the short ones
OUTAGE = 6.0  # seconds the lock is held; three leases' worth
LEASE = 2.0


def committed(logs: LogRecorder) -> set[tuple[int, int]]:
    """(job, attempt) of every result an agent was told is durable."""
    return {
        (int(e["job"]), int(e["attempt"]))
        for e in logs.events("result_committed", logger="vcomp.agent")
    }


@pytest.mark.slow
async def test_store_locked_mid_batch(lab: Lab, logs: LogRecorder) -> None:
    org = lab.org(lease_seconds=LEASE, store_busy_timeout=0.3)
    await lab.start(org)
    org.add_app("sleeper", SLEEPER)
    inputs = [json.dumps({"sleep": LONG, "i": i}).encode() for i in range(AGENTS)]
    inputs += [
        json.dumps({"sleep": SHORT, "i": i, "repeat": BIG if i % 4 == 0 else 1}).encode()
        for i in range(AGENTS, 30)
    ]
    batch = org.submit("sleeper", inputs, wall_seconds=30, max_attempts=5)
    configs = [lab.agent_config(org, f"agent{i}", cores=2) for i in range(AGENTS)]
    agents = [await lab.run_agent(c, org) for c in configs]
    store = org.store
    jobs = [store.get_job_by_index(batch, i).job_id for i in range(len(inputs))]
    long_jobs = jobs[:AGENTS]

    # Every long job is running (leased and renewed a few times) when the lock is taken.
    await wait_until(
        lambda: all(store.list_attempts(j) for j in long_jobs), "the long jobs to be leased", 60
    )
    await asyncio.sleep(1.0)
    lock = HeldLock(org.config.store_path)
    finished_before = len(logs.events("job_finished", logger="vcomp.agent"))
    try:
        await asyncio.sleep(OUTAGE)
        # Results came in meanwhile, and none could be committed.
        finished = len(logs.events("job_finished", logger="vcomp.agent")) - finished_before
        assert finished > 0, "no result arrived during the outage"
        # Nothing can commit now, so nothing may have been ACKed that is not stored
        # (reads still work: the store is in WAL mode).
        for job, attempt in sorted(committed(logs)):
            assert store.result_exists(job, attempt), (job, attempt)
        assert store.batch_status(batch).done < len(inputs), "the outage came too late"
    finally:
        lock.release()

    await org.wait_batch(batch, timeout=120)
    await wait_until(lambda: all(len(a.runtime.spool) == 0 for a in agents), "spools to drain", 60)
    assert_results_unique(store, batch)
    for job in jobs:  # no lease expired and was reissued: every job went out once
        attempts = store.list_attempts(job)
        assert len(attempts) == 1, [(a.attempt, a.state, a.reason) for a in attempts]
    for job, attempt in sorted(committed(logs)):
        assert store.result_exists(job, attempt), (job, attempt)
    for index, (_result, output) in org.outputs(batch).items():
        data = inputs[index]
        repeat = json.loads(data).get("repeat", 1)
        assert output == hashlib.sha256(data).hexdigest().encode() * repeat, index
    # No session was closed for the outage: each agent still has its first one.
    assert logs.events("session_closed", logger="vcomp.server") == []
    assert [a.connected_sessions for a in agents] == [2] * AGENTS  # one per worker
    assert org.live_sessions() == 2 * AGENTS
    # Logged once per state change, not per attempt or per result.
    down = logs.events("store_unavailable", logger="vcomp.server")
    up = logs.events("store_available", logger="vcomp.server")
    assert len(down) == 1 and len(up) == 1, (down, up)
    assert "database is locked" in down[0]["error"]
    for noisy in ("internal_error", "tick_failed", "lease_expired", "holder_reset"):
        assert logs.events(noisy, logger="vcomp.server") == [], noisy
