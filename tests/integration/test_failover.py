"""Agents that know several servers: failover, and lost jobs handed back at once.

The two servers are ``vcomp-server serve`` processes run from two copies of one
server home (one organisation key, one enrolment), each over its own SQLite file:
SQLite serves one server only, so here each server has its own queue, and the
tests judge by what lands in each store. Job ids of the two stores overlap; where
an agent's lost job on A has an id that B also uses, B's copy is leased to another
enrolled agent, as it would be in a shared store (attempts are never reused).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    AgentHandle,
    Lab,
    LogRecorder,
    ProcessLog,
    assert_results_unique,
    free_udp_port,
    python_job,
    wait_until,
)
from tests.udpproxy import Direction
from vcomp.agent.config import AgentConfig, init_agent_home
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.server.config import STORE_FILE, init_server_home
from vcomp.server.scheduler import LOST_REASON
from vcomp.server.store import AttemptState, JobState
from vcomp.server.store.sqlite import SqliteStore

SLEEPY = python_job("time.sleep(600)\nreturn b'never'")
QUICK = python_job("return data.upper()")
JOB_LIMITS = {"cpu_seconds": 30, "memory_bytes": 256 << 20, "wall_seconds": 900}


def enroll(store: SqliteStore, tpm: SimulatedTpm, name: str) -> str:
    e = parse_enrolment(format_enrolment(tpm, name))
    store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
    return e.agent_id


@dataclasses.dataclass
class Cluster:
    """Server homes A and B (B a copy of A), a free port each, and one agent home."""

    homes: dict[str, Path]
    ports: dict[str, int]
    agent: AgentConfig
    agent_id: str
    other_id: str  # a second enrolled agent, never run: holds leases in B's store

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def store(self, name: str) -> SqliteStore:
        return SqliteStore(self.homes[name] / STORE_FILE)


def make_cluster(lab: Lab, prepare_a: list[bytes]) -> Cluster:
    """Home A with the agent enrolled and the apps added (and ``prepare_a`` sleepy jobs
    in one batch), copied to home B; each on its own port, sessions idling out in 10 s."""
    home_a = lab.root / "srv-a"
    fingerprint = init_server_home(home_a)
    ports = {"a": free_udp_port(), "b": free_udp_port()}
    agent = init_agent_home(
        lab.root / "agent",
        name="agent",
        servers=[f"127.0.0.1:{ports['a']}", f"127.0.0.1:{ports['b']}"],
        server_key=fingerprint,
    )
    agent = dataclasses.replace(agent, mode="full", cores=1)
    with SqliteStore(home_a / STORE_FILE) as store:
        agent_id = enroll(store, SimulatedTpm.open(agent.tpm_dir), "agent")
        other_id = enroll(store, SimulatedTpm.open(lab.root / "tpm-other"), "other")
        store.allow_measurement(golden_measurement(agent.policy()).format())
        for name, code in (("sleepy", SLEEPY), ("quick", QUICK)):
            path = lab.root / f"{name}.py"
            path.write_bytes(code)
            store.add_app(name, "python", path)
        if prepare_a:
            store.create_batch("sleepy", prepare_a, **JOB_LIMITS)  # type: ignore[arg-type]
    home_b = lab.root / "srv-b"
    shutil.copytree(home_a, home_b)
    homes = {"a": home_a, "b": home_b}
    for name, home in homes.items():
        toml = home / "server.toml"
        text = toml.read_text().replace("127.0.0.1:7461", f"127.0.0.1:{ports[name]}")
        toml.write_text(text.replace("idle_timeout = 60.0", "idle_timeout = 10.0"))
    return Cluster(homes, ports, agent, agent_id, other_id)


def quick_batch(store: SqliteStore, n: int) -> int:
    inputs = [f"job {i}".encode() for i in range(n)]
    return store.create_batch("quick", inputs, **JOB_LIMITS)  # type: ignore[arg-type]


def assert_done_by(store: SqliteStore, batch: int, agent_id: str, n: int) -> None:
    records = list(store.iter_results(batch))
    assert len(records) == n
    for rec in records:
        assert rec.state is JobState.DONE and rec.result is not None
        assert rec.result.agent_id == agent_id
        with store.open_output(rec.job_id, rec.result.attempt) as blob:
            assert blob.read(0, blob.size) == f"JOB {rec.index}".encode()


def sessions_on(log: ProcessLog, agent_id: str) -> int:
    return len(log.events("session_established", agent=agent_id[:16]))


@pytest.mark.slow
async def test_workers_move_to_the_next_server_when_one_is_killed(
    lab: Lab, logs: LogRecorder
) -> None:
    cluster = make_cluster(lab, prepare_a=[b"long"])  # job 1 on A: runs until A dies
    with cluster.store("b") as store:
        # B's own job 1 is leased to the other agent (as in a shared store, where job 1
        # attempt 1 is one lease): the agent's report of its lost job 1 must not touch it.
        held = store.lease_next(cluster.other_id, time.time(), 3600)
        assert held is not None and (held.job_id, held.attempt) == (1, 1)
        batch_b = quick_batch(store, 4)
    server_a, log_a = await lab.serve(cluster.homes["a"], "a")
    _, log_b = await lab.serve(cluster.homes["b"], "b")
    agent = await lab.run_agent(cluster.agent)  # one worker: it starts on A, the first
    await wait_until(
        lambda: logs.events("job_started", logger="vcomp.agent", job=1), "the job on A", 60
    )
    assert sessions_on(log_a, cluster.agent_id) == 1 and sessions_on(log_b, cluster.agent_id) == 0

    server_a.killpg()
    assert await server_a.wait(10) == -signal.SIGKILL

    with cluster.store("b") as store:
        await wait_until(lambda: store.batch_status(batch_b).finished, "B's batch", 120)
        assert_done_by(store, batch_b, cluster.agent_id, 4)
        # The report of job 1 (A's) reached B, which left the other agent's lease alone.
        (attempt,) = store.list_attempts(1)
        assert (attempt.agent_id, attempt.state) == (cluster.other_id, AttemptState.LEASED)
    assert sessions_on(log_b, cluster.agent_id) >= 1
    assert logs.events(
        "server_switch",
        logger="vcomp.agent",
        **{"from": cluster.address("a"), "to": cluster.address("b")},
    )
    assert logs.events("job_cancelled", logger="vcomp.agent", job=1, reason="session ended")
    assert logs.events("job_reported_lost", logger="vcomp.agent", job=1, attempt=1)
    assert agent.connected_sessions >= 2


@pytest.mark.slow
@pytest.mark.parametrize("down", ["port_closed", "silent"])
async def test_an_agent_whose_first_server_is_down_ends_up_on_the_next(
    lab: Lab, logs: LogRecorder, down: str
) -> None:
    """A is not running: its port is closed (the kernel answers ICMP port unreachable,
    and the handshake ends at once), or nothing answers at all (a relay that drops
    everything: the handshake gives up after 30 s). Either way the worker moves on."""
    cluster = make_cluster(lab, prepare_a=[])
    agent_config = cluster.agent
    if down == "silent":
        black_hole = await lab.proxy(("127.0.0.1", cluster.ports["a"]))
        black_hole.cut()
        first = f"127.0.0.1:{black_hole.address[1]}"
        agent_config = dataclasses.replace(agent_config, servers=(first, cluster.address("b")))
    else:
        first = cluster.address("a")
    with cluster.store("b") as store:
        batch_b = quick_batch(store, 2)
    _, log_b = await lab.serve(cluster.homes["b"], "b")  # A never starts
    agent: AgentHandle = await lab.run_agent(agent_config)
    with cluster.store("b") as store:
        await wait_until(lambda: store.batch_status(batch_b).finished, "B's batch", 120)
        assert_done_by(store, batch_b, cluster.agent_id, 2)
    assert sessions_on(log_b, cluster.agent_id) == agent.connected_sessions >= 1
    assert logs.events(
        "server_switch", logger="vcomp.agent", **{"from": first, "to": cluster.address("b")}
    )
    refused = logs.events("session_refused", logger="vcomp.agent", code=40)
    reason = refused[0]["reason"] if refused else ""
    assert reason.startswith("server unreachable"), refused
    assert ("port is closed" in reason) == (down == "port_closed"), reason


@pytest.mark.slow
async def test_a_job_lost_with_its_session_is_handed_back_at_the_next(
    lab: Lab, logs: LogRecorder
) -> None:
    """The link drops for longer than the idle timeout while a job runs: the agent stops
    the job, and at its next session reports it, so the server releases the lease at
    once. Without the report the job would wait out a 600 s lease."""
    org = lab.org(lease_seconds=600, idle_timeout=10)
    await lab.start(org)
    proxy = await lab.proxy(org.address)
    home = lab.agent_config(org, "agent", server=proxy.address)
    await lab.run_agent(home, org)
    org.add_app("sleepy", SLEEPY)
    batch = org.submit("sleepy", [b"long"], wall_seconds=900)
    job = org.store.get_job_by_index(batch, 0).job_id
    await wait_until(
        lambda: logs.events("job_started", logger="vcomp.agent", job=job), "the job to run", 60
    )

    proxy.cut()
    await wait_until(
        lambda: logs.events("job_cancelled", logger="vcomp.agent", reason="session ended"),
        "the agent to give up the dead session",
        60,
    )
    proxy.restore()

    def first_attempt_ended() -> bool:
        return org.store.list_attempts(job)[0].state is not AttemptState.LEASED

    await wait_until(first_attempt_ended, "the lost lease to be released", 60)
    first = org.store.list_attempts(job)[0]
    assert (first.state, first.reason) == (AttemptState.RELEASED, LOST_REASON)
    assert first.ended_at is not None and first.ended_at < first.deadline  # before expiry
    print(
        f"\nlost lease released {first.ended_at - first.leased_at:.1f} s after it was leased, "
        f"{first.deadline - first.ended_at:.0f} s before its deadline"
    )
    assert logs.events("job_reported_lost", logger="vcomp.agent", job=job, attempt=1)
    assert logs.events("lease_released", logger="vcomp.server", job=job, attempt=1)
    # Not a refusal (it would never be offered to this agent again): it is re-leased.
    await wait_until(lambda: len(org.store.list_attempts(job)) == 2, "the job to be re-leased")
    second = org.store.list_attempts(job)[1]
    assert second.agent_id == lab.agent_ids["agent"] and second.state is AttemptState.LEASED


@pytest.mark.slow
async def test_a_result_committed_by_a_server_that_died_is_recorded_once_by_the_next(
    lab: Lab, logs: LogRecorder
) -> None:
    """Server A commits the result but its ACK never reaches the agent, and A is
    SIGKILLed. The agent resends its spooled result to B, a server on the same store
    (as on a shared database; SQLite allows one server at a time, so B starts once A
    is dead): B answers "already recorded" (outcome duplicate, an ordinary ACK) and
    the agent drops the result from its spool."""
    cluster = make_cluster(lab, prepare_a=[])
    home_a = cluster.homes["a"]
    proxy = await lab.proxy(("127.0.0.1", cluster.ports["a"]))
    agent = dataclasses.replace(
        cluster.agent, servers=(f"127.0.0.1:{proxy.address[1]}", cluster.address("b"))
    )
    with SqliteStore(home_a / STORE_FILE) as store:
        batch = quick_batch(store, 1)
    server_a, _ = await lab.serve(cluster.homes["a"], "a")
    handle = await lab.run_agent(agent)
    await wait_until(lambda: logs.events("job_started", logger="vcomp.agent", job=1), "the job", 60)
    proxy.cut(Direction.TO_AGENT)  # A hears the result; the agent never hears the ACK
    with SqliteStore(home_a / STORE_FILE) as store:
        await wait_until(lambda: store.result_exists(1, 1), "A to commit the result", 60)
    server_a.killpg()
    assert await server_a.wait(10) == -signal.SIGKILL

    # B: the same home and store, on B's port.
    toml = home_a / "server.toml"
    toml.write_text(toml.read_text().replace(cluster.address("a"), cluster.address("b")))
    cluster.homes["b"] = home_a
    _, log_b = await lab.serve(cluster.homes["b"], "b")
    await wait_until(
        lambda: log_b.events("result_recorded", job=1, attempt=1, outcome="duplicate"),
        "B to answer the resent result",
        90,
    )
    await wait_until(lambda: len(handle.runtime.spool) == 0, "the spool to drain")
    assert logs.events("result_resent", logger="vcomp.agent", job=1, attempt=1)
    assert logs.events("result_committed", logger="vcomp.agent", job=1, attempt=1)
    with SqliteStore(home_a / STORE_FILE) as store:
        assert_results_unique(store, batch)
        assert store.batch_status(batch).done == 1
