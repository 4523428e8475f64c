"""RESET during CODE, during a job run and during RESULT (a real sandboxed agent).

The operator's reset goes through the store as ``vcomp-server reset`` does; the
server picks it up within its 0.5 s tick. Each test then checks that the agent
came back to READY on the same session, that the interrupted attempt was
released, and that the job still completed with the right output: never lost.
"""

from __future__ import annotations

import hashlib

from tests.integration.conftest import (
    AgentHandle,
    Lab,
    LogRecorder,
    Org,
    assert_results_unique,
    python_job,
    wait_until,
)
from tests.udpproxy import NO_FAULTS, Faults, UdpProxy
from vcomp.protocol.server_session import ServerState
from vcomp.server.store import AttemptState

SLOW_PATH = Faults(delay=0.005)  # 10 ms round trips: transfers take seconds, not millis
DIGEST_JOB = python_job("return hashlib.sha256(data).hexdigest().encode()")


async def setup(
    lab: Lab, *, window: int, code: bytes, output_bytes: int = 1 << 20
) -> tuple[Org, UdpProxy, AgentHandle, int]:
    org = lab.org(window=window)
    await lab.start(org)
    proxy = await lab.proxy(org.address, to_server=SLOW_PATH, to_agent=SLOW_PATH)
    agent = await lab.run_agent(lab.agent_config(org, "agent", server=proxy.address), org)
    await wait_until(lambda: agent.connected_sessions, "the agent to connect")
    org.add_app("app", code)
    batch = org.submit("app", [b"the input"], output_bytes=output_bytes)
    return org, proxy, agent, batch


async def reset_now(org: Org, agent: AgentHandle, proxy: UdpProxy, logs: LogRecorder) -> str:
    """Request a RESET as the CLI does; once sent, let the network run at full speed."""
    org.store.request_reset(agent.agent_id)
    sent = await wait_until(
        lambda: logs.events("reset_sent", logger="vcomp.server"), "the server to send RESET"
    )
    proxy.set_faults(NO_FAULTS)
    return sent[0]["session"]


async def assert_recovered(
    org: Org, agent: AgentHandle, batch: int, session: str, logs: LogRecorder, expected: bytes
) -> None:
    await org.wait_batch(batch, timeout=60)
    # Back to READY on the same session: the server saw READY in the new epoch.
    done = await wait_until(
        lambda: logs.events("reset_done", logger="vcomp.server", session=session), "reset_done"
    )
    assert done[0]["epoch"] == "1"
    assert logs.events("reset_received", logger="vcomp.agent")
    job_id = org.store.get_job_by_index(batch, 0).job_id
    attempts = org.store.list_attempts(job_id)
    assert attempts[0].attempt == 1 and attempts[0].state is AttemptState.RELEASED
    assert attempts[0].reason == "reset by the operator"
    outputs = org.outputs(batch)
    assert outputs[0][1] == expected
    assert_results_unique(org.store, batch)


def assert_one_session(agent: AgentHandle, logs: LogRecorder) -> None:
    assert logs.events("session_closed", logger="vcomp.agent") == []
    assert agent.connected_sessions == 1


async def test_reset_during_code(lab: Lab, logs: LogRecorder) -> None:
    # 400 KB of code at window 1 over 10 ms round trips: several seconds of CODE.
    code = python_job("return hashlib.sha256(data).hexdigest().encode()", pad=400_000)
    org, proxy, agent, batch = await setup(lab, window=1, code=code)

    def sending() -> bool:
        endpoint = org.server.endpoint
        assert endpoint is not None
        return any(s.state is ServerState.SENDING_JOB for s in endpoint.sessions.values())

    await wait_until(sending, "CODE to start flowing")
    session = await reset_now(org, agent, proxy, logs)

    await assert_recovered(
        org, agent, batch, session, logs, hashlib.sha256(b"the input").hexdigest().encode()
    )
    assert_one_session(agent, logs)
    # Attempt 1 never reached the sandbox: it was dropped mid-transfer.
    assert logs.events("job_aborted", logger="vcomp.agent", attempt=1)
    assert logs.events("job_started", logger="vcomp.agent", attempt=1) == []
    assert logs.events("job_delivered", logger="vcomp.server", attempt=1) == []


async def test_reset_during_run(lab: Lab, logs: LogRecorder) -> None:
    code = python_job("time.sleep(3)\nreturn hashlib.sha256(data).hexdigest().encode()")
    org, proxy, agent, batch = await setup(lab, window=4, code=code)

    await wait_until(
        lambda: logs.events("job_started", logger="vcomp.agent", attempt=1), "the job to run"
    )
    session = await reset_now(org, agent, proxy, logs)

    await assert_recovered(
        org, agent, batch, session, logs, hashlib.sha256(b"the input").hexdigest().encode()
    )
    assert_one_session(agent, logs)
    # The run of attempt 1 was killed, never finished, never reported.
    assert logs.events("job_aborted", logger="vcomp.agent", attempt=1)
    assert logs.events("job_finished", logger="vcomp.agent", attempt=1) == []
    job_id = org.store.get_job_by_index(batch, 0).job_id
    assert 1 not in {r.attempt for r in org.store.list_results(job_id)}


async def test_reset_during_result(lab: Lab, logs: LogRecorder) -> None:
    # A 1 MB result at window 4 over 10 ms round trips: a couple of seconds of RESULT.
    code = python_job("return hashlib.sha256(data).digest() * 31250")
    org, proxy, agent, batch = await setup(lab, window=4, code=code, output_bytes=2 << 20)

    await wait_until(
        lambda: logs.events("job_finished", logger="vcomp.agent", attempt=1),
        "the result to start flowing",
    )
    session = await reset_now(org, agent, proxy, logs)

    await assert_recovered(
        org, agent, batch, session, logs, hashlib.sha256(b"the input").digest() * 31250
    )
    # The result was cut off by the RESET, not recorded before it.
    lines = logs.lines
    first_record = next(i for i, line in enumerate(lines) if "event=result_recorded" in line)
    reset_line = next(i for i, line in enumerate(lines) if "event=reset_sent" in line)
    assert reset_line < first_record


async def test_result_cut_by_reset_is_resent_and_acknowledged(lab: Lab, logs: LogRecorder) -> None:
    code = python_job("return hashlib.sha256(data).digest() * 31250")
    org, proxy, agent, batch = await setup(lab, window=4, code=code, output_bytes=2 << 20)
    await wait_until(
        lambda: logs.events("job_finished", logger="vcomp.agent", attempt=1),
        "the result to start flowing",
    )
    await reset_now(org, agent, proxy, logs)
    await org.wait_batch(batch, timeout=60)

    # The interrupted result is resent (RESET restarts the stream) and acknowledged.
    await wait_until(
        lambda: logs.events("result_resent", logger="vcomp.agent", attempt=1),
        "attempt 1's result to be resent",
        timeout=5,
    )
    await wait_until(lambda: len(agent.runtime.spool) == 0, "the spool to drain", timeout=10)
    assert [line for line in logs.lines if "event handler failed" in line] == []
