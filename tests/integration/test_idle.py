"""Keepalives: an idle but healthy session must outlive the configured idle timeout."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import Lab, wait_until

IDLE_TIMEOUT = 10.0  # the smallest idle timeout an agent accepts from a server


@pytest.mark.slow
async def test_idle_session_survives_its_idle_timeout(lab: Lab) -> None:
    org = lab.org(idle_timeout=IDLE_TIMEOUT)
    await lab.start(org)
    tpm = lab.lite_tpm(org, "idle")
    agent = await lab.lite(tpm, org.address, org.fingerprint, org=org)
    await wait_until(agent.connected.is_set, "the agent to connect")

    # No jobs: only keepalives can keep the session up. Wait past the idle timeout.
    await asyncio.sleep(IDLE_TIMEOUT + 3)

    assert agent.stats.closed == []
    assert org.live_sessions() == 1
