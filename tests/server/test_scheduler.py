"""The scheduler's handling of a lease whose session is gone (PROTOCOL.md section 8.6).

A real in-process server and store; the oracle is the store's attempt row and the
server's log, not what the scheduler returns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from tests.hostile.harness import add_batch, new_tpm, start_org
from vcomp.server.store import LeaseRequest
from vcomp.server.store.records import AttemptState


async def test_a_lease_whose_agent_left_before_start_is_released_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's session ended (AGENT_SHUTDOWN, idle timeout) while its lease request
    was at the store: the attempt is released, so the next lease of the job takes the
    next attempt number, and the operator sees why that number was used up."""
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    try:
        add_batch(org.store, 1, max_attempts=3)  # an agent may take 2 of the 3
        request = LeaseRequest(agent_id=org.tpm.agent_id.hex(), now=time.time(), lease_seconds=60)
        [lease] = org.store.lease_many([request])
        assert lease is not None
        gone = 0x5E55_1011  # no session has this id
        assert org.server.session(gone) is None
        with caplog.at_level(logging.INFO, logger="vcomp.server"):
            await org.server.scheduler._start_or_release(gone, lease)
        [attempt] = org.store.list_attempts(lease.job_id)
        assert (attempt.attempt, attempt.state) == (lease.attempt, AttemptState.RELEASED)
        assert attempt.reason == "agent left before START"
        lines = [r.getMessage() for r in caplog.records if "lease_unstarted" in r.getMessage()]
        assert len(lines) == 1, caplog.text
        assert f"job={lease.job_id}" in lines[0] and f"attempt={lease.attempt}" in lines[0]
        assert "agent left before START" in lines[0]
        # The job goes to the next lease, even to the same agent, as the next attempt.
        [again] = org.store.lease_many([request])
        assert again is not None and (again.job_id, again.attempt) == (lease.job_id, 2)
    finally:
        await org.server.stop()
