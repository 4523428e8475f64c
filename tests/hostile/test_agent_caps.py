"""One enrolled key must not take the whole queue, nor hold a job forever.

The attacker is an enrolled, attested agent (a simulated TPM, so root on the
volunteer's machine can run any agent code). It opens many sessions from one
key and never finishes a job; the server is a real ``vcomp-server serve``
process. The oracle is what the attacker got: sessions that completed the
handshake, jobs it received, and whether an honest agent still ran the rest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from vcomp.protocol import events as ev
from vcomp.server.store import AttemptState, JobState

from .harness import HoldingAgent, ProcessOrg, add_batch, new_tpm, start_process_org, until

SESSION_CAP = 3
LEASE_CAP = 2
ATTACKER_SESSIONS = 8
JOBS = 10


def _settled(agent: HoldingAgent) -> bool:
    return bool(agent.of_type(ev.Connected) or agent.of_type(ev.Rejected))


async def _open(org: ProcessOrg, count: int) -> list[HoldingAgent]:
    agents = [HoldingAgent(org, org.tpm) for _ in range(count)]  # type: ignore[arg-type]
    for agent in agents:
        await agent.start()
    return agents


async def test_one_key_gets_at_most_its_session_cap(tmp_path: Path) -> None:
    org = start_process_org(
        tmp_path / "srv",
        new_tpm(tmp_path / "tpm"),
        tmp_path / "server.log",
        server={"max_sessions_per_agent": SESSION_CAP},
    )
    agents: list[HoldingAgent] = []
    try:
        agents = await _open(org, ATTACKER_SESSIONS)
        await until(lambda: all(_settled(a) for a in agents), 60, "every handshake to end")
        connected = [a for a in agents if a.of_type(ev.Connected)]
        rejected = [e for a in agents for e in a.of_type(ev.Rejected)]
        print(f"\n{len(connected)} of {ATTACKER_SESSIONS} sessions from one key were admitted")
        assert len(connected) <= SESSION_CAP
        assert len(connected) == SESSION_CAP  # the cap is not a blanket refusal
        assert all("sessions" in e.reason for e in rejected), rejected
    finally:
        for agent in agents:
            agent.close()
        assert org.stop() == 0


async def test_one_key_holds_at_most_its_lease_cap(tmp_path: Path) -> None:
    honest_tpm = new_tpm(tmp_path / "honest-tpm")
    org = start_process_org(
        tmp_path / "srv",
        new_tpm(tmp_path / "tpm"),
        tmp_path / "server.log",
        server={"max_sessions_per_agent": ATTACKER_SESSIONS, "max_leases_per_agent": LEASE_CAP},
        others=(honest_tpm,),
    )
    honest = org.agent(honest_tpm)
    attackers: list[HoldingAgent] = []
    try:
        batch = add_batch(org.store, JOBS)
        attackers = await _open(org, ATTACKER_SESSIONS)
        await until(lambda: all(a.of_type(ev.Connected) for a in attackers), 60, "the sessions")
        await until(lambda: sum(len(a.jobs) for a in attackers) >= LEASE_CAP, 20, "leases")
        await asyncio.sleep(1.5)  # three server ticks: every idle session was offered a job
        await honest.start()

        def queue_empty() -> bool:
            status = org.store.batch_status(batch)
            return status.queued == 0 and status.leased + status.done == JOBS

        await until(queue_empty, 60, "every job to leave the queue")
        held = sum(len(a.jobs) for a in attackers)
        leased_to_attacker = [
            x
            for r in org.store.iter_results(batch)
            for x in org.store.list_attempts(r.job_id)
            if x.agent_id == org.tpm.agent_id.hex() and x.state is AttemptState.LEASED
        ]
        print(f"\none key with {ATTACKER_SESSIONS} sessions holds {held} of {JOBS} jobs")
        assert held <= LEASE_CAP
        assert len(leased_to_attacker) <= LEASE_CAP
        await until(lambda: honest.stats.committed == JOBS - held, 60, "the honest agent")
    finally:
        for agent in attackers:
            agent.close()
        if honest.adapter is not None:
            honest.adapter.close()
        assert org.stop() == 0


async def test_a_job_held_past_its_hard_deadline_is_reissued(tmp_path: Path) -> None:
    """The holder keeps its session alive (so the lease is renewed) and never finishes."""
    honest_tpm = new_tpm(tmp_path / "honest-tpm")
    org = start_process_org(
        tmp_path / "srv",
        new_tpm(tmp_path / "tpm"),
        tmp_path / "server.log",
        jobs={"lease_seconds": 2.0, "transfer_seconds": 2.0},
        others=(honest_tpm,),
    )
    honest = org.agent(honest_tpm)
    (holder,) = await _open(org, 1)
    try:
        batch = add_batch(org.store, 1, wall_seconds=2, max_attempts=3)
        await until(lambda: bool(holder.jobs), 20, "the holder's job")
        await honest.start()
        await until(honest.connected.is_set, 20, "the honest agent's session")
        # Hard deadline: lease 2 s + wall 2 s + transfer 2 s = 6 s after the lease; the
        # bound here is generous liveness, not a timing claim.
        await until(lambda: org.store.batch_status(batch).done == 1, 60, "the job to be reissued")
        (record,) = org.store.iter_results(batch)
        assert record.state is JobState.DONE
        assert record.result is not None and record.result.agent_id == honest_tpm.agent_id.hex()
        first = org.store.list_attempts(record.job_id)[0]
        assert first.agent_id == org.tpm.agent_id.hex()
        assert first.state is AttemptState.EXPIRED
        # The holder's session was told to drop the job.
        await until(lambda: bool(holder.of_type(ev.ResetReceived)), 20, "the RESET")
    finally:
        holder.close()
        if honest.adapter is not None:
            honest.adapter.close()
        assert org.stop() == 0
