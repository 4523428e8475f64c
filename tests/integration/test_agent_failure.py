"""Agent failure: a `vcomp-agent join` process SIGKILLed mid-job loses nothing, and an
agent restarted mid-RESULT resends the result it had spooled.

The server keeps renewing a lease while the agent's session is alive, so a
killed agent's job comes back only after its session idles out (10 s here) and
the short lease (2 s) expires; then another agent completes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path

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


DEEP_THEN_ECHO = python_job("""
if data != b"deep":
    return data.upper()
import os
for _ in range(3000):  # deeper than PATH_MAX
    os.mkdir("a")
    os.chdir("a")
open("f", "wb").close()
return b"went deep"
""")


def leave_a_deep_tree(root: Path, depth: int = 3000) -> None:
    """What a crashed agent could leave in its work dir (built without long paths)."""
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("a", dir_fd=fd)
        child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


async def test_deep_tree_job_is_reported_and_the_agent_goes_on(lab: Lab) -> None:
    """Issue 13 finding 3, against a real `vcomp-agent join` and a real server: the job
    that leaves a tree deeper than PATH_MAX gets its result to the server, the worker
    takes the next job, nothing stays on disk, and SIGTERM ends the agent cleanly."""
    org = lab.org()
    await lab.start(org)
    home = lab.agent_config(org, "deep")
    leftover = home.work_dir / "w0" / "job-from-a-crash"
    leave_a_deep_tree(leftover)
    await org.synced()
    org.add_app("deep", DEEP_THEN_ECHO)
    first = org.submit("deep", [b"deep"])

    agent, agent_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(home.home), "--mode", "full"], "deep"
    )
    await org.wait_batch(first, timeout=90)
    second = org.submit("deep", [b"next"])
    await org.wait_batch(second, timeout=90)

    assert org.outputs(first)[0][1] == b"went deep"
    assert org.outputs(second)[0][1] == b"NEXT"
    assert [e["status"] for e in agent_log.events("job_finished")] == ["ok", "ok"]
    assert list((home.work_dir / "w0").iterdir()) == []  # the leftover went at start-up too
    agent.signal(signal.SIGTERM)
    assert await agent.wait(20) == 0
    assert agent_log.events("agent_stopped")
    assert not any("Traceback" in line for line in agent_log.lines), agent_log.lines[-20:]


async def test_an_agent_failure_around_a_job_is_reported(lab: Lab, logs: LogRecorder) -> None:
    """No exception on the job path may leave the attempt running forever: with the
    worker's work root gone (a real host failure: the sandbox cannot make the job's
    directory) the server hears `agent_error`, and the worker takes the next job."""
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "broken")
    org.add_app("echo", python_job("return data.upper()"))
    agent = await lab.run_agent(config, org)
    await wait_until(lambda: agent.connected_sessions, "the agent to connect")
    work_root = config.work_dir / "w0"
    work_root.rmdir()
    work_root.write_text("not a directory")
    broken = org.submit("echo", [b"lost"], max_attempts=1)
    await org.wait_batch(broken, timeout=90)
    job_id = org.store.get_job_by_index(broken, 0).job_id
    [result] = org.store.list_results(job_id)
    assert (result.attempt, result.status) == (1, "agent_error"), result
    assert "NotADirectoryError" in result.error
    assert logs.events("job_agent_error", logger="vcomp.agent", job=job_id, attempt=1)
    work_root.unlink()
    work_root.mkdir()
    fine = org.submit("echo", [b"again"])
    await org.wait_batch(fine, timeout=90)
    assert org.outputs(fine)[0][1] == b"AGAIN"
