"""JOB_LOST from a hostile enrolled agent, against a real ``vcomp-server serve``.

An agent reports a job lost (its session ended with it) and the server releases the
lease at once. Job ids are guessable, so a report for another agent's live lease must
change nothing, and each report may cost a store lookup, so a flood of reports must
not buy the sender store work. Oracles: the attempts in the store, and the server
process's CPU seconds for a flood of reports against the same number of other job
ERRORs that the server answers from memory.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from vcomp.protocol import events as ev
from vcomp.protocol.messages import Error, ErrorCode
from vcomp.server.scheduler import LOST_REASON
from vcomp.server.service import LOST_REPORTS_PER_SESSION
from vcomp.server.store import AttemptState

from .harness import (
    HoldingAgent,
    ServerProcess,
    add_batch,
    new_tpm,
    start_process_org,
    until,
)

FLOOD = 30_000


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _send_errors(agent: HoldingAgent, code: ErrorCode, keys: list[tuple[int, int]]) -> None:
    """Job ERRORs with ``code`` for ``keys``, as fast as the window allows, until acked."""
    assert agent.session is not None and agent.adapter is not None
    channel = agent.session.channel
    assert channel is not None
    sent = 0
    while sent < len(keys) and channel.close_reason is None:
        while sent < len(keys) and channel.queue_space > 0:
            job, attempt = keys[sent]
            channel.send_reliable(Error(code=code, message="lost", job=job, attempt=attempt))
            sent += 1
        agent.adapter.kick()
        await asyncio.sleep(0.002)
    await until(lambda: channel.send_idle or channel.close_reason is not None, 120, "acks")
    assert channel.close_reason is None, channel.close_reason


async def test_job_lost_reports_release_only_the_senders_lease_and_cost_little(
    tmp_path: Path,
) -> None:
    attacker, victim = new_tpm(tmp_path / "attacker"), new_tpm(tmp_path / "victim")
    log = tmp_path / "server.log"
    org = start_process_org(tmp_path / "srv", attacker, log, others=(victim,))
    agents: list[HoldingAgent] = []
    try:
        add_batch(org.store, 2, wall_seconds=600)
        # The attacker's first session takes a job and vanishes (no goodbye): a lease
        # of its own that its next session may rightly report lost.
        first = HoldingAgent(org, attacker)
        agents.append(first)
        await first.start()
        await until(lambda: bool(first.jobs), 30, "the attacker's job")
        own = (first.jobs[0].description.job, first.jobs[0].description.attempt)
        first.close()
        holder = HoldingAgent(org, victim)
        agents.append(holder)
        await holder.start()
        await until(lambda: bool(holder.jobs), 30, "the victim's job")
        theirs = (holder.jobs[0].description.job, holder.jobs[0].description.attempt)
        # A restarted server (or another one on a shared store) knows both leases only
        # from the store: the store's owner check is what is under test.
        org.server.stop()
        log = tmp_path / "server2.log"
        org.server = ServerProcess(tmp_path / "srv", log)

        second = HoldingAgent(org, attacker)
        agents.append(second)
        await second.start()
        await until(lambda: bool(second.of_type(ev.Connected)), 30, "the attacker's session")
        # In the session's budget: the victim's lease first, then its own.
        await _send_errors(second, ErrorCode.JOB_LOST, [theirs, own])

        def released() -> bool:
            return org.store.list_attempts(own[0])[0].state is not AttemptState.LEASED

        await until(released, 30, "the attacker's own lost lease to be released")
        mine = org.store.list_attempts(own[0])[0]
        assert (mine.state, mine.reason) == (AttemptState.RELEASED, LOST_REASON)
        # Looked up before the attacker's own (one store thread, in order): untouched.
        (victims,) = org.store.list_attempts(theirs[0])
        assert (victims.agent_id, victims.state) == (victim.agent_id.hex(), AttemptState.LEASED)

        # A flood of reports for unknown keys, against as many refusals of unknown keys
        # (answered from memory), on the same session.
        unknown = [(1_000_000 + i, 1) for i in range(FLOOD)]
        before = _cpu_seconds(org.server.pid)
        await _send_errors(second, ErrorCode.SANDBOX_FAILURE, unknown)
        control = _cpu_seconds(org.server.pid) - before
        before = _cpu_seconds(org.server.pid)
        await _send_errors(second, ErrorCode.JOB_LOST, unknown)
        flood = _cpu_seconds(org.server.pid) - before
        print(
            f"\n{FLOOD} JOB_LOST reports: server {flood:.2f} CPU s; "
            f"{FLOOD} refusals of unknown jobs: {control:.2f} CPU s"
        )
        assert org.server.alive()
        assert flood <= 1.3 * control + 0.05, f"{flood:.2f} CPU s against {control:.2f}"
        await until(lambda: "event=lost_reports_dropped" in log.read_text(), 30, "the log line")
        assert log.read_text().count("event=lost_reports_dropped") == 1  # once per session
        assert LOST_REPORTS_PER_SESSION < FLOOD
        (victims,) = org.store.list_attempts(theirs[0])
        assert victims.state is AttemptState.LEASED
    finally:
        for agent in agents:
            agent.close()
        org.stop()
