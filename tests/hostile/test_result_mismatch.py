"""A result whose bytes do not match the SHA-256 its agent declared.

The server refuses it. Its log and the attempt's record must say so: the server
refused the agent's result (and why), not "the agent refused the job".
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from vcomp.protocol.messages import Result

from .harness import HoldingAgent, add_batch, new_tpm, start_org, until


async def test_a_result_refused_by_the_server_is_logged_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vcomp")
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    agent = HoldingAgent(org, org.tpm)
    try:
        batch = add_batch(org.store, 1, max_attempts=3)
        await agent.start()
        await until(lambda: bool(agent.jobs), 20, "a job")
        d = agent.jobs[0].description
        assert agent.session is not None and agent.session.channel is not None
        assert agent.adapter is not None
        channel = agent.session.channel
        channel.send_reliable(
            Result(job=d.job, attempt=d.attempt, offset=0, total=4, data=b"four", fin=False)
        )
        channel.send_reliable(
            Result(
                job=d.job,
                attempt=d.attempt,
                offset=4,
                total=4,
                data=b"",
                fin=True,
                sha256=hashlib.sha256(b"five").digest(),  # not what was sent
                status="ok",
                detail="",
                cpu_ms=1,
                wall_ms=1,
            )
        )
        agent.adapter.kick()
        job_id = org.store.get_job_by_index(batch, 0).job_id
        await until(
            lambda: org.store.list_attempts(job_id)[0].reason is not None, 20, "the attempt to end"
        )
        (attempt,) = org.store.list_attempts(job_id)
        assert org.store.list_results(job_id) == []
    finally:
        agent.close()
        await org.server.stop()
    lines = [r.getMessage() for r in caplog.records]
    about = [ln for ln in lines if f"job={d.job} " in ln and "refused" in ln]
    assert not [ln for ln in about if "event=job_refused" in ln], about
    (refused,) = [ln for ln in about if "event=result_refused" in ln]
    assert "by=server" in refused and f"agent={org.tpm.agent_id.hex()[:16]}" in refused
    assert "does not match" in refused
    assert attempt.reason is not None and attempt.reason.startswith("result refused by the server")
