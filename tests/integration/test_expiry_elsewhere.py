"""Every server runs lease expiry: a lease this server holds, expired through another.

Two ``serve`` processes cannot share an SQLite store (its serve lock), so the other
server's expiry is its one store call, ``expire_leases``, made here on the admin's
own handle on the same file while the agent works. This server's next renewal finds
the attempt no longer leased: it drops the assignment from memory, and the agent's
result, when it comes, is recorded as late, ACKed, and nothing is logged as an error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.integration.conftest import Lab, LogRecorder, python_job, wait_until
from vcomp.server.store import JobState

SLEEPER = python_job(
    "time.sleep(json.loads(data)['sleep'])\nreturn hashlib.sha256(data).hexdigest().encode()"
)
LEASE = 6.0  # renewed after 2 s; the job runs 5 s


def _remover(logger: logging.Logger, handler: logging.Handler) -> Callable[[], Awaitable[None]]:
    async def remove() -> None:
        logger.removeHandler(handler)

    return remove


@pytest.mark.slow
async def test_a_lease_expired_by_another_server_is_dropped_here(
    lab: Lab, logs: LogRecorder
) -> None:
    warnings = Records(logging.WARNING)  # the server's WARNING and ERROR lines
    server_log = logging.getLogger("vcomp.server")
    server_log.addHandler(warnings)
    lab.on_close(_remover(server_log, warnings))
    org = lab.org(lease_seconds=LEASE)
    await lab.start(org)
    org.add_app("sleeper", SLEEPER)
    batch = org.submit("sleeper", [json.dumps({"sleep": 5.0}).encode()], wall_seconds=30)
    job = org.store.get_job_by_index(batch, 0).job_id
    agent = await lab.run_agent(lab.agent_config(org, "agent0"), org)
    await wait_until(lambda: logs.events("job_started", logger="vcomp.agent"), "the job to start")
    agent_id = bytes.fromhex(agent.agent_id)
    assert org.server.scheduler.held_by((job, 1), agent_id)

    # "Another server" expires it: the lease was issued here, the expiry runs elsewhere.
    expired = org.store.expire_leases(time.time() + 2 * LEASE)
    assert [(x.job_id, x.attempt) for x in expired] == [(job, 1)]

    await wait_until(
        lambda: logs.events("lease_gone", logger="vcomp.server", job=job, attempt=1),
        "this server's renewal to find the lease gone",
        3 * LEASE,
    )
    assert not org.server.scheduler.held_by((job, 1), agent_id)  # dropped from memory
    await org.wait_batch(batch)
    recorded = logs.events("result_recorded", logger="vcomp.server", job=job, attempt=1)
    assert [e["outcome"] for e in recorded] == ["late"]
    # The committed ACK reaches the agent after the store commit that ends the batch.
    await wait_until(
        lambda: logs.events("result_committed", logger="vcomp.agent", job=job, attempt=1),
        "the agent to see its late result committed",
    )
    assert org.store.get_job(job).state is JobState.DONE
    assert [a.attempt for a in org.store.list_attempts(job)] == [1]  # not reissued meanwhile
    assert [r.getMessage() for r in warnings.records] == []


@pytest.mark.slow
async def test_a_dead_sessions_lease_settled_elsewhere_is_forgotten_here(
    lab: Lab, logs: LogRecorder
) -> None:
    """The session that held a lease dies and "another server" expires the lease: this
    server's memory of it must not count against the agent's lease cap for good."""
    org = lab.org(lease_seconds=LEASE, idle_timeout=3)
    await lab.start(org)
    proxy = await lab.proxy(org.address)
    agent = await lab.run_agent(lab.agent_config(org, "agent0", server=proxy.address), org)
    org.add_app("sleeper", SLEEPER)
    batch = org.submit("sleeper", [json.dumps({"sleep": 60.0}).encode()], wall_seconds=90)
    job = org.store.get_job_by_index(batch, 0).job_id
    await wait_until(lambda: logs.events("job_started", logger="vcomp.agent"), "the job to start")
    proxy.cut()  # for good: the agent never reaches this server again
    await wait_until(
        lambda: logs.events("session_closed", logger="vcomp.server"), "the server to drop it", 30
    )
    scheduler = org.server.scheduler
    agent_id = bytes.fromhex(agent.agent_id)
    assert scheduler.held_by((job, 1), agent_id)  # the lease outlives its session here
    expired = org.store.expire_leases(time.time() + 2 * LEASE)  # "another server"
    assert [(x.job_id, x.attempt) for x in expired] == [(job, 1)]
    await wait_until(
        lambda: logs.events("lease_forgotten", logger="vcomp.server", job=job, attempt=1),
        "this server to forget the orphaned lease",
        6 * LEASE,
    )
    assert not scheduler.held_by((job, 1), agent_id)
    assert scheduler.leases_held(agent.agent_id) == 0


class Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
