"""Server failure: `vcomp-server serve` SIGKILLed while results arrive, then restarted.

Every result an agent saw acknowledged (its ``event=result_committed`` lines) must
be in the store the killed server left behind; after a restart on the same store
and port the agents reconnect, resend what was not acknowledged, every job
completes, and no (job, attempt) is recorded twice.
"""

from __future__ import annotations

import signal

import pytest

from tests.integration.conftest import (
    PI_PY,
    Lab,
    LogRecorder,
    assert_results_unique,
    free_udp_port,
    pi_inputs,
    pi_reference,
    wait_until,
)
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.server.config import STORE_FILE, init_server_home
from vcomp.server.store import JobState
from vcomp.server.store.sqlite import SqliteStore

JOBS = 40


def committed(logs: LogRecorder) -> set[tuple[int, int]]:
    """(job, attempt) of every result the agents were told is durable."""
    return {
        (int(e["job"]), int(e["attempt"]))
        for e in logs.events("result_committed", logger="vcomp.agent")
    }


@pytest.mark.slow
async def test_server_killed_while_results_arrive(lab: Lab, logs: LogRecorder) -> None:
    home = lab.root / "srv"
    fingerprint = init_server_home(home)
    port = free_udp_port()
    config = (home / "server.toml").read_text()
    config = config.replace("127.0.0.1:7461", f"127.0.0.1:{port}")
    # Dead sessions are noticed after 10 s; leases of jobs cut off mid-run expire soon.
    config = config.replace("idle_timeout = 60.0", "idle_timeout = 10.0")
    config = config.replace("lease_seconds = 300.0", "lease_seconds = 5.0")
    (home / "server.toml").write_text(config)
    inputs = pi_inputs(JOBS, 20_000, seed0=500)
    agent_homes = [lab.agent_home(f"agent{i}", ("127.0.0.1", port), fingerprint) for i in range(2)]
    with SqliteStore(home / STORE_FILE) as store:
        store.add_app("pi", "python", PI_PY)
        batch = store.create_batch(
            "pi", inputs, cpu_seconds=30, memory_bytes=256 << 20, wall_seconds=60
        )
        for a in agent_homes:
            e = parse_enrolment(format_enrolment(SimulatedTpm.open(a.tpm_dir), a.name))
            store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
            store.allow_measurement(golden_measurement(a.policy()).format())

    first, _ = await lab.serve(home, "serve1")
    agents = [await lab.run_agent(a) for a in agent_homes]
    await wait_until(lambda: len(committed(logs)) >= 8, "results to arrive", 60)
    first.killpg()
    assert await first.wait(10) == -signal.SIGKILL

    # Everything acknowledged so far is in the store the dead server left.
    acked_before_restart = committed(logs)
    with SqliteStore(home / STORE_FILE) as store:
        done_at_kill = store.batch_status(batch).done
        for job, attempt in sorted(acked_before_restart):
            assert store.result_exists(job, attempt), (job, attempt)
    assert done_at_kill < JOBS, "the kill came too late to test anything"

    await lab.serve(home, "serve2")
    with SqliteStore(home / STORE_FILE) as store:
        await wait_until(lambda: store.batch_status(batch).finished, "the batch to finish", 120)
        # The agents' spools drain: every result they made was acknowledged.
        await wait_until(
            lambda: all(len(a.runtime.spool) == 0 for a in agents), "spools to drain", 60
        )
        for job, attempt in sorted(committed(logs)):
            assert store.result_exists(job, attempt), (job, attempt)
        assert_results_unique(store, batch)
        for rec in store.iter_results(batch):
            assert rec.state is JobState.DONE and rec.result is not None
            with store.open_output(rec.job_id, rec.result.attempt) as blob:
                assert blob.read(0, blob.size) == pi_reference(inputs[rec.index])
    # Both agents lost their session and came back to the restarted server.
    assert all(a.connected_sessions >= 2 for a in agents)
