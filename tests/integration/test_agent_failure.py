"""Agent failure: a `vcomp-agent join` process SIGKILLed mid-job loses nothing, and an
agent restarted mid-RESULT resends the result it had spooled.

The server keeps renewing a lease while the agent's session is alive, so a
killed agent's job comes back only after its session idles out (10 s here) and
the short lease (2 s) expires; then another agent completes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal

import pytest

from tests.integration.conftest import (
    AGENT_CLI,
    AgentHandle,
    Lab,
    LogRecorder,
    Org,
    assert_results_unique,
    python_job,
    wait_until,
)
from tests.udpproxy import NO_FAULTS, Faults
from vcomp.server.store import AttemptState

SLOW_PATH = Faults(delay=0.005)
SLEEPY = python_job("time.sleep(3)\nreturn hashlib.sha256(data).hexdigest().encode()")


@pytest.mark.slow
async def test_killed_agent_job_is_reassigned(lab: Lab, logs: LogRecorder) -> None:
    org = lab.org(lease_seconds=2, idle_timeout=10)
    await lab.start(org)
    victim_home = lab.agent_config(org, "victim")
    rescuer_home = lab.agent_config(org, "rescuer")
    await org.synced()
    org.add_app("sleepy", SLEEPY)
    batch = org.submit("sleepy", [b"precious input"])

    victim, victim_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(victim_home.home), "--mode", "full"], "victim"
    )
    await wait_until(
        lambda: victim_log.events("job_started", attempt=1), "the victim to run the job", 60
    )
    victim.killpg()  # SIGKILL: no goodbye, no hand-back, the sandbox dies with it
    assert await victim.wait(10) == -signal.SIGKILL
    rescuer = await lab.run_agent(rescuer_home, org)

    await org.wait_batch(batch, timeout=90)

    victim_id, rescuer_id = lab.agent_ids["victim"], lab.agent_ids["rescuer"]
    assert rescuer.agent_id == rescuer_id
    job_id = org.store.get_job_by_index(batch, 0).job_id
    attempts = org.store.list_attempts(job_id)
    assert [(a.attempt, a.agent_id, a.state) for a in attempts] == [
        (1, victim_id, AttemptState.EXPIRED),
        (2, rescuer_id, AttemptState.SUCCEEDED),
    ]
    expired = logs.events("lease_expired", logger="vcomp.server", job=job_id, attempt=1)
    assert expired and expired[0]["job_state"] == "queued"
    result, output = org.outputs(batch)[0]
    assert (result.agent_id, result.attempt) == (rescuer_id, 2)
    assert output == hashlib.sha256(b"precious input").hexdigest().encode()
    assert victim_log.events("job_finished") == []  # it really died mid-job


BIG_RESULT = python_job("return hashlib.sha256(data).digest() * 31250")  # 1 MB


async def restart_mid_result(lab: Lab, logs: LogRecorder) -> tuple[Org, AgentHandle, int]:
    """An agent stops while its 1 MB result is half sent and the link is down; a new
    agent process on the same home (same TPM, same sealed spool) takes over."""
    org = lab.org(window=4)
    await lab.start(org)
    proxy = await lab.proxy(org.address, to_server=SLOW_PATH, to_agent=SLOW_PATH)
    home = lab.agent_config(org, "agent", server=proxy.address)
    first = await lab.run_agent(home, org)
    org.add_app("big", BIG_RESULT)
    batch = org.submit("big", [b"the input"], output_bytes=2 << 20)
    await wait_until(
        lambda: logs.events("job_finished", logger="vcomp.agent", attempt=1),
        "the result to start flowing",
    )
    await wait_until(lambda: proxy.stats.to_server["forwarded"] > 100, "part of the result")
    proxy.cut()
    first.runtime.stop()
    await asyncio.wait_for(first.task, 20)
    assert len(first.runtime.spool) == 1  # sealed on disk, unacknowledged
    proxy.restore()
    proxy.set_faults(NO_FAULTS)
    second = await lab.run_agent(home, org)
    await org.wait_batch(batch, timeout=60)
    return org, second, batch


async def test_restarted_agent_resends_its_spooled_result(lab: Lab, logs: LogRecorder) -> None:
    org, second, batch = await restart_mid_result(lab, logs)

    assert logs.events("result_resent", logger="vcomp.agent", job=1, attempt=1)
    result, output = org.outputs(batch)[0]
    assert result.attempt == 1  # the resent result counted: no rerun was needed
    assert output == hashlib.sha256(b"the input").digest() * 31250
    await wait_until(lambda: len(second.runtime.spool) == 0, "the spool to drain")
    assert_results_unique(org.store, batch)
    # The half-received upload of the first session was dropped, not fed the resend.
    assert [line for line in logs.lines if "event handler failed" in line] == []
