"""An enrolled, attested agent that misbehaves inside its own authenticated session.

With a simulated TPM a volunteer who is root can run modified agent code and
still attest, so the server must not trust one session with another's job. Job
ids are small sequential integers, so the attacker can simply guess them. The
victim holds a running job; the attacker, from its own valid session, sends
messages about the victim's job. The victim's lease must survive and its result
must commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

import pytest

from vcomp.protocol import events as ev
from vcomp.protocol.messages import Error, ErrorCode, Message, Result
from vcomp.protocol.wire import PacketType
from vcomp.server.store import AttemptState, JobState

from .capture import CaptureProxy
from .harness import HoldingAgent, Org, add_batch, enroll, new_tpm, start_org, until

BIG_CODE = b"#" * (300 * 1024)


def _summary(job: int, attempt: int, status: str, detail: str) -> Result:
    """The closing RESULT of an empty result."""
    return Result(
        job=job,
        attempt=attempt,
        offset=0,
        total=0,
        data=b"",
        fin=True,
        sha256=hashlib.sha256(b"").digest(),
        status=status,
        detail=detail,
        cpu_ms=0,
        wall_ms=0,
    )


def _attacks(job: int, attempt: int) -> dict[str, Message]:
    return {
        # "I refuse this job": the server requeues it and drops the assignment.
        "refuse": Error(
            code=ErrorCode.SANDBOX_FAILURE, message="not mine", job=job, attempt=attempt
        ),
        # "I hand this job back" (what a shutting-down agent sends for its own job).
        "hand_back": _summary(job, attempt, "returned", ""),
        # "I refuse this job", as the real agent says it: a RESULT of status refused.
        "refuse_result": _summary(job, attempt, "refused", "not mine"),
        # The first chunk of a result for the victim's job, never finished.
        "poison_chunk": Result(
            job=job, attempt=attempt, offset=0, total=5, data=b"AAAAA", fin=False
        ),
    }


async def _quiet(org: Org) -> None:
    """Let spawned tasks reach the committer, then wait for its queue to drain."""
    for _ in range(5):
        await asyncio.sleep(0.02)
    await org.server.committer.run(lambda: None)


async def _connected(org: Org, agent: HoldingAgent) -> None:
    established = org.server.stats.sessions_established
    await agent.start()
    await until(lambda: org.server.stats.sessions_established > established, 20, "READY")


@pytest.mark.parametrize(
    ("attack", "stage"),
    [
        ("refuse", "running"),
        ("refuse_result", "running"),
        ("poison_chunk", "running"),
        ("hand_back", "running"),  # the store refuses a result from the wrong agent
        ("refuse", "transferring"),
        ("hand_back", "transferring"),
    ],
)
async def test_an_agent_cannot_touch_another_agents_job(
    tmp_path: Path, attack: str, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vcomp")
    # A job of many windows, so that a transfer can be caught in the middle.
    org = await start_org(tmp_path, new_tpm(tmp_path / "victim-tpm"), code=BIG_CODE)
    attacker_tpm = new_tpm(tmp_path / "attacker-tpm")
    enroll(org.store, attacker_tpm, "attacker")
    proxy = CaptureProxy(org.address)
    await proxy.start()
    victim = HoldingAgent(org, org.tpm, proxy.address)
    attacker = HoldingAgent(org, attacker_tpm)
    try:
        await until(lambda: attacker_tpm.agent_id in org.server.trust.enrolled, 5, "enrolment")
        await _connected(org, victim)
        if stage == "transferring":
            proxy.hold_after = PacketType.START  # hold the victim's ACKs: the transfer stalls
        batch = add_batch(org.store, 1, tag="victim")
        await until(lambda: org.store.batch_status(batch).leased == 1, 20, "the victim's lease")
        (job,) = [r.job_id for r in org.store.iter_results(batch)]
        (attempt,) = [a.attempt for a in org.store.list_attempts(job)]
        if stage == "running":
            await until(lambda: bool(victim.jobs), 20, "the victim's job")
        await _connected(org, attacker)

        assert attacker.session is not None and attacker.session.channel is not None
        attacker.session.channel.send_reliable(_attacks(job, attempt)[attack])
        assert attacker.adapter is not None
        attacker.adapter.kick()
        channel = attacker.session.channel
        await until(lambda: channel.send_idle, 10, "the server to acknowledge the attack")
        await _quiet(org)

        # The attacker's text reached no log line: it holds no lease.
        assert [r.getMessage() for r in caplog.records if "not mine" in r.getMessage()] == []
        # The victim's lease is untouched, and the attacker was not handed the job.
        (record,) = [a for a in org.store.list_attempts(job) if a.attempt == attempt]
        assert record.state is AttemptState.LEASED, record
        assert attacker.jobs == []
        if stage == "transferring":
            proxy.hold_after = None
            proxy.release()
            await until(
                lambda: bool(victim.jobs or victim.of_type(ev.SessionClosed)), 20, "the victim"
            )
            assert victim.of_type(ev.SessionClosed) == []

        # The victim finishes, and its result is the one recorded.
        victim.finish(victim.jobs[0])
        assert victim.session is not None and victim.session.channel is not None
        victim_channel = victim.session.channel
        await until(
            lambda: victim_channel.send_idle or bool(victim.of_type(ev.SessionClosed)),
            10,
            "the server to take the result",
        )
        assert victim.of_type(ev.SessionClosed) == []
        await _quiet(org)
        assert org.store.batch_status(batch).done == 1
        await until(lambda: bool(victim.of_type(ev.ResultCommitted)), 5, "the final ACK")
    finally:
        victim.close()
        attacker.close()
        proxy.close()
        await org.server.stop()


async def test_an_agent_can_refuse_its_own_job(tmp_path: Path) -> None:
    """The control: the same ERROR about the agent's *own* job does give it back.

    It is a refusal: the job is queued again with its budget intact (add_batch
    allows one attempt), for other agents.
    """
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    agent = HoldingAgent(org, org.tpm)
    try:
        await _connected(org, agent)
        add_batch(org.store, 1, tag="own")
        await until(lambda: bool(agent.jobs), 20, "the job")
        d = agent.jobs[0].description
        assert agent.session is not None and agent.session.channel is not None
        agent.session.channel.send_reliable(_attacks(d.job, d.attempt)["refuse"])
        assert agent.adapter is not None
        agent.adapter.kick()
        await until(
            lambda: any(
                a.attempt == d.attempt and a.state is AttemptState.REFUSED
                for a in org.store.list_attempts(d.job)
            ),
            10,
            "the lease to be given back",
        )
        assert org.store.get_job(d.job).state is JobState.QUEUED
    finally:
        agent.close()
        await org.server.stop()
