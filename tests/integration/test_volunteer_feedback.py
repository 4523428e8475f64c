"""What a volunteer is told: a wrong pinned key, an unenrolled agent, a dead server,
and a second agent on one home (issue 11, part 6). Real server, real UDP, real agent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Iterator

import pytest

from tests.integration.conftest import PI_PY, Lab, LogRecorder, pi_inputs, wait_until
from vcomp.agent.runtime import AgentRuntime
from vcomp.errors import ConfigError
from vcomp.protocol import handshake as hs
from vcomp.server.config import load_signing_key


async def run_until_it_stops(runtime: AgentRuntime) -> BaseException | None:
    """Run the agent; it must stop by itself. Returns what run() raised."""
    task = asyncio.ensure_future(runtime.run())
    try:
        await wait_until(task.done, "the agent to stop by itself", timeout=90)
    finally:
        if not task.done():
            runtime.stop()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 15)
    return task.exception()


async def test_a_wrong_pinned_key_stops_the_agent_with_one_clear_line(
    lab: Lab, logs: LogRecorder
) -> None:
    org = lab.org()
    await lab.start(org)
    impostor = hashlib.sha256(b"the key the volunteer was told to pin").hexdigest()
    config = lab.agent_config(org, "agent", server_key=impostor)
    await org.synced()
    error = await run_until_it_stops(AgentRuntime(config, shutdown_grace=1.0))
    assert isinstance(error, ConfigError), error
    text = str(error)
    assert f"offered key fingerprint {org.fingerprint}" in text and impostor in text
    assert "check the fingerprint with the organisation" in text
    assert len(logs.events("server_key_mismatch", logger="vcomp.agent")) == 1


async def test_pinning_the_raw_key_of_an_old_server_pub_is_named(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    raw = hs.raw_public(load_signing_key(org.home / "server.key")).hex()
    config = lab.agent_config(org, "agent", server_key=raw)  # the old server.pub's contents
    await org.synced()
    error = await run_until_it_stops(AgentRuntime(config, shutdown_grace=1.0))
    assert isinstance(error, ConfigError), error
    assert "raw public key" in str(error) and org.fingerprint in str(error)


async def test_an_unenrolled_agent_is_told_to_send_its_enrolment_line(
    lab: Lab, logs: LogRecorder
) -> None:
    org = lab.org()
    await lab.start(org)
    org.add_app("pi", PI_PY)
    org.submit("pi", pi_inputs(1, 1000))
    agent = await lab.run_agent(lab.agent_config(org, "stranger", enroll=False), org)
    refused = await wait_until(
        lambda: logs.events("session_refused", logger="vcomp.agent"), "the refusal"
    )
    assert refused[0]["reason"] == "unknown_key"
    assert "vcomp-agent enrolment --line" in refused[0]["hint"]
    assert agent.runtime.workers[0].stats.jobs == 0


@pytest.fixture
def black_hole() -> Iterator[tuple[str, int]]:
    """A UDP port that takes every datagram and never answers: a dead server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield "127.0.0.1", s.getsockname()[1]


async def test_a_dead_server_is_reported_at_once_and_at_each_retry(
    lab: Lab, logs: LogRecorder, black_hole: tuple[str, int]
) -> None:
    host, port = black_hole
    config = lab.agent_home("agent", black_hole, "ab" * 32)
    agent = await lab.run_agent(config)
    retries = await wait_until(
        lambda: (
            len(logs.events("no_answer", logger="vcomp.agent")) >= 2
            and logs.events("no_answer", logger="vcomp.agent")
        ),
        "two handshake retries",
    )
    connecting = logs.events("connecting", logger="vcomp.agent")
    assert connecting[0]["server"] == f"{host}:{port}"
    # Said before the first retry, and each retry says when the next one comes.
    lines = [ln for ln in logs.lines if "event=connecting" in ln or "event=no_answer" in ln]
    assert "event=connecting" in lines[0]
    assert [r["tries"] for r in retries[:2]] == ["2", "3"]
    # Backed off from 1 s, jittered between half and all of it, never under 1 s, at
    # most 2 s (limits.HANDSHAKE_RETRANSMIT, HANDSHAKE_RETRANSMIT_MAX).
    delays = [r["retry_in"] for r in retries[:2]]
    assert all(d.endswith("s") and 1.0 <= float(d[:-1]) <= 2.0 for d in delays), delays
    assert agent.connected_sessions == 0


async def test_a_second_agent_on_the_same_home_is_refused(lab: Lab) -> None:
    config = lab.agent_home("agent", ("127.0.0.1", 9), "ab" * 32)
    first = AgentRuntime(config)
    with pytest.raises(ConfigError, match=r"already running with .*agent"):
        AgentRuntime(config)
    first.close()
    AgentRuntime(config).close()  # released: the home can be used again
