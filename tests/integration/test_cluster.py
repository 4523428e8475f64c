"""Several servers over one PostgreSQL: a server killed, the database restarted.

Real everything: a throwaway PostgreSQL cluster (initdb + pg_ctl as an unprivileged
user), ``vcomp-server serve --bind`` subprocesses sharing one home and one store,
real agents (the sandbox) that know both servers. Each test is judged by the store
(every job done, each (job, attempt) recorded once, pi within 4 sigma) and by what the
agents were told (every result they saw acknowledged is in the store).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    PI_PY,
    AgentHandle,
    Lab,
    LogRecorder,
    Process,
    ProcessLog,
    assert_results_unique,
    free_udp_port,
    pi_inputs,
    wait_until,
)
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.errors import StoreUnavailable
from vcomp.pgcluster import PostgresCluster
from vcomp.server.config import init_server_home
from vcomp.server.scheduler import SILENT_SERVER_SECONDS
from vcomp.server.store import AttemptState, JobState, LeaseRequest, Store, open_store
from vcomp.server.store.sql.leases import ORPHAN_REASON

JOBS = 40
# About 1 s of CPU a job either way (the job uses numpy when the interpreter has it), so
# work is still left when the killed server's agents arrive on the other one.
POINTS = 150_000_000 if importlib.util.find_spec("numpy") else 6_000_000


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> str:
    return pg_cluster.fresh_schema_url()


@dataclasses.dataclass
class Cluster:
    home: Path
    store: Store
    batch: int
    inputs: list[bytes]
    addresses: list[str]
    servers: list[tuple[Process, ProcessLog]] = dataclasses.field(default_factory=list)
    agents: list[AgentHandle] = dataclasses.field(default_factory=list)


async def start_cluster(lab: Lab, url: str, n_agents: int = 3) -> Cluster:
    home = lab.root / "srv"
    fingerprint = init_server_home(home, store_url=url)
    # Agents notice a dead server after the idle timeout (10 s, not 60); the lease stays
    # long (300 s), so a job that waited for expiry would time the test out.
    toml = home / "server.toml"
    toml.write_text(toml.read_text().replace("idle_timeout = 60.0", "idle_timeout = 10.0"))
    addresses = [f"127.0.0.1:{free_udp_port()}" for _ in range(2)]
    inputs = pi_inputs(JOBS, POINTS, seed0=900)
    store = open_store(url)

    async def close_store() -> None:
        store.close()

    lab.on_close(close_store)
    store.add_app("pi", "python", PI_PY)
    configs = []
    for i in range(n_agents):
        config = lab.agent_home(f"agent{i}", ("127.0.0.1", 1), fingerprint)
        # Agents 0 and 2 start on the first server, agent 1 on the second.
        order = addresses if i % 2 == 0 else addresses[::-1]
        config = dataclasses.replace(config, servers=tuple(order))
        e = parse_enrolment(format_enrolment(SimulatedTpm.open(config.tpm_dir), config.name))
        store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
        store.allow_measurement(golden_measurement(config.policy()).format())
        configs.append(config)
    batch = store.create_batch("pi", inputs, cpu_seconds=30, wall_seconds=60, max_attempts=5)
    c = Cluster(home, store, batch, inputs, addresses)
    for i, address in enumerate(addresses):
        c.servers.append(await lab.serve(home, f"serve{i}", bind=address))
    for config in configs:
        c.agents.append(await lab.run_agent(config))
    return c


def acked(logs: LogRecorder) -> set[tuple[int, int]]:
    """(job, attempt) of every result an agent was told is durable."""
    return {
        (int(e["job"]), int(e["attempt"]))
        for e in logs.events("result_committed", logger="vcomp.agent")
    }


def assert_batch_correct(c: Cluster, logs: LogRecorder) -> None:
    status = c.store.batch_status(c.batch)
    assert status.done == JOBS and status.failed == 0, status
    assert_results_unique(c.store, c.batch)
    for job, attempt in sorted(acked(logs)):
        assert c.store.result_exists(job, attempt), (job, attempt)
    inside = points = 0
    for rec in c.store.iter_results(c.batch):
        assert rec.state is JobState.DONE and rec.result is not None
        with c.store.open_output(rec.job_id, rec.result.attempt) as blob:
            out = json.loads(blob.read(0, blob.size))
        inside, points = inside + int(out["inside"]), points + int(out["points"])
    sigma = 4 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / points)
    assert abs(4 * inside / points - math.pi) < 4 * sigma


def finished(c: Cluster) -> bool:
    """The batch is finished; the test's own pooled connection may have died with the
    database once, as the servers' did."""
    try:
        return c.store.batch_status(c.batch).finished
    except StoreUnavailable:
        return False


def sessions_on(log: ProcessLog) -> set[str]:
    """Agent ids (16 hex digits) that established a session with this server."""
    return {e["agent"] for e in log.events("session_established")}


@pytest.mark.slow
async def test_server_killed_mid_batch_agents_fail_over(
    lab: Lab, logs: LogRecorder, pg_url: str
) -> None:
    c = await start_cluster(lab, pg_url)
    await wait_until(
        lambda: c.store.batch_status(c.batch).done >= JOBS // 4, "a quarter of the batch", 120
    )
    (victim, victim_log), (_, survivor_log) = c.servers
    on_victim = sessions_on(victim_log)
    assert on_victim, "no agent was on the server to kill"
    victim.killpg()
    assert await victim.wait(10) == -signal.SIGKILL
    killed_at = time.time()
    assert c.store.batch_status(c.batch).done < JOBS, "the kill came too late to test anything"

    await wait_until(lambda: c.store.batch_status(c.batch).finished, "the batch to finish", 240)
    await wait_until(
        lambda: all(len(a.runtime.spool) == 0 for a in c.agents), "spools to drain", 60
    )
    assert_batch_correct(c, logs)
    # The killed server's agents went on with the other server and finished work there.
    assert on_victim <= sessions_on(survivor_log)
    moved = {a.agent_id for a in c.agents if a.agent_id[:16] in on_victim}
    after_kill = {
        r.agent_id
        for rec in c.store.iter_results(c.batch)
        for r in c.store.list_results(rec.job_id)
        if r.received_at > killed_at
    }
    assert moved <= after_kill, "an agent of the killed server did no work afterwards"
    # Jobs cut off by the kill came back at once (JOB_LOST, or the silent server's
    # leases released), none through lease expiry.
    for rec in c.store.iter_results(c.batch):
        for attempt in c.store.list_attempts(rec.job_id):
            assert attempt.state is not AttemptState.EXPIRED, attempt


@pytest.mark.slow
async def test_database_restart_mid_batch(
    lab: Lab, logs: LogRecorder, pg_url: str, pg_cluster: PostgresCluster
) -> None:
    c = await start_cluster(lab, pg_url)
    await wait_until(
        lambda: c.store.batch_status(c.batch).done >= JOBS // 4, "a quarter of the batch", 120
    )
    sessions_before = [a.connected_sessions for a in c.agents]
    acked_before = acked(logs)
    pg_cluster.restart("fast")
    await wait_until(lambda: finished(c), "the batch to finish", 240)
    assert_batch_correct(c, logs)
    # Everything acknowledged before the restart was committed before it.
    for job, attempt in sorted(acked_before):
        assert c.store.result_exists(job, attempt)
    # The servers kept their sessions through the outage.
    assert [a.connected_sessions for a in c.agents] == sessions_before
    # Each server noticed the restart (its pooled connections died with it) and logged
    # it once as it went and once as it came back, not once per attempt.
    for _, log in c.servers:
        went, back = log.events("store_unavailable"), log.events("store_available")
        print(f"\n{len(went)} store_unavailable, {len(back)} store_available")
        assert 1 <= len(went) == len(back) <= 2


@pytest.mark.slow
async def test_a_silent_servers_leases_are_released_by_the_others(
    lab: Lab, logs: LogRecorder, pg_url: str
) -> None:
    """A server killed between committing a lease and its START reaching the agent leaves
    a lease nobody can hand back (the agent never heard of it). Once that server has been
    silent for SILENT_SERVER_SECONDS, a live server releases it instead of waiting out
    the lease."""
    home = lab.root / "srv"
    init_server_home(home, store_url=pg_url)
    with open_store(pg_url) as admin:
        admin.add_app("pi", "python", PI_PY)
        batch = admin.create_batch("pi", pi_inputs(1, 1000), max_attempts=3)
        config = lab.agent_home("agent", ("127.0.0.1", 1), "00" * 32)
        e = parse_enrolment(format_enrolment(SimulatedTpm.open(config.tpm_dir), config.name))
        admin.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
        long_ago = time.time() - 2 * SILENT_SERVER_SECONDS
        admin.server_alive("killed-server", "127.0.0.1:9", long_ago)
        [lease] = admin.lease_many(
            [LeaseRequest(e.agent_id, time.time(), 3600.0, server_id="killed-server")]
        )
        assert lease is not None
        _, log = await lab.serve(home, "serve", bind=f"127.0.0.1:{free_udp_port()}")

        def released() -> bool:
            return admin.list_attempts(lease.job_id)[0].state is AttemptState.RELEASED

        await wait_until(released, "the live server to release the orphaned lease", 30)
        [attempt] = admin.list_attempts(lease.job_id)
        assert attempt.reason == ORPHAN_REASON
        assert admin.get_job(lease.job_id).state is JobState.QUEUED  # offered again
        assert log.events("lease_orphaned", job=str(lease.job_id), attempt="1")
        assert batch
