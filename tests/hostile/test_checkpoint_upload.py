"""A hostile enrolled agent and uploaded checkpoints ([jobs] upload_checkpoints).

The server is a real in-process OrganisationServer on a real UDP socket; the agent is
a real AgentSession that sends what an honest one never would. The oracle is what the
store kept and whether later attempts would resume from the attacker's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol.messages import Checkpoint, ErrorCode
from vcomp.server.config import load_server_config
from vcomp.server.service import OrganisationServer

from .harness import APP, HoldingAgent, Org, make_server_home, new_tpm, prepare_store, until


async def _org(root: Path) -> Org:
    tpm = new_tpm(root / "tpm")
    fingerprint = make_server_home(root / "srv")
    config_file = root / "srv" / "server.toml"
    config_file.write_text(
        config_file.read_text().replace("upload_checkpoints = false", "upload_checkpoints = true")
    )
    config = load_server_config(root / "srv")
    assert config.jobs.upload_checkpoints
    server = OrganisationServer(config)
    prepare_store(server.store, tpm)
    address = await server.start()
    return Org(server, address, bytes.fromhex(fingerprint), tpm, hs.generate_ephemeral())


def _batch(org: Org, *, quorum: int) -> int:
    return org.store.create_batch(
        APP,
        [json.dumps({"quorum": quorum}).encode()],
        cpu_seconds=5,
        memory_bytes=1 << 26,
        wall_seconds=60,
        output_bytes=1 << 16,
        replicas=quorum,
        quorum=quorum,
    )


def _upload(agent: HoldingAgent, job: ev.JobReceived, state: bytes) -> None:
    """CHECKPOINT chunks and fin for ``job``, whatever START offered."""
    assert agent.session is not None and agent.session.channel is not None
    assert agent.adapter is not None
    d = job.description
    channel = agent.session.channel
    channel.send_reliable(
        Checkpoint(job=d.job, attempt=d.attempt, offset=0, total=len(state), data=state, fin=False)
    )
    channel.send_reliable(
        Checkpoint(
            job=d.job,
            attempt=d.attempt,
            offset=len(state),
            total=len(state),
            data=b"",
            fin=True,
            sha256=hashlib.sha256(state).digest(),
        )
    )
    agent.adapter.kick()


async def test_a_replicated_job_takes_no_checkpoint_from_its_agent(tmp_path: Path) -> None:
    """Quorum 2: a checkpoint would let one agent steer the other replica's result.
    START offers none, and one sent anyway ends the session and is not kept."""
    org = await _org(tmp_path)
    agent = HoldingAgent(org, org.tpm)
    try:
        await agent.start()
        batch = _batch(org, quorum=2)
        await until(lambda: bool(agent.jobs), 20, "the replica's START")
        [job] = agent.jobs
        assert job.description.checkpoint_bytes == 0
        assert agent.session is not None
        assert not agent.session.submit_checkpoint(
            job=job.description.job, attempt=job.description.attempt, state=b"poison"
        )
        _upload(agent, job, b"poison")
        await until(lambda: bool(agent.of_type(ev.SessionClosed)), 20, "the server to close")
        [closed] = agent.of_type(ev.SessionClosed)
        assert closed.code == ErrorCode.PROTOCOL_VIOLATION
        job_id = org.store.get_job_by_index(batch, 0).job_id
        assert org.store.latest_checkpoint(job_id) is None
    finally:
        agent.close()
        await org.server.stop()


async def test_a_single_result_job_keeps_its_holders_checkpoint_only(tmp_path: Path) -> None:
    org = await _org(tmp_path)
    agent = HoldingAgent(org, org.tpm)
    try:
        await agent.start()
        batch = _batch(org, quorum=1)
        await until(lambda: bool(agent.jobs), 20, "START")
        [job] = agent.jobs
        d = job.description
        assert d.checkpoint_bytes == load_server_config(tmp_path / "srv").jobs.checkpoint_bytes
        assert agent.session is not None
        # An honest session does not send one over the offer.
        assert not agent.session.submit_checkpoint(
            job=d.job, attempt=d.attempt, state=bytes(d.checkpoint_bytes + 1)
        )
        assert agent.session.submit_checkpoint(job=d.job, attempt=d.attempt, state=b"honest")
        assert agent.adapter is not None
        agent.adapter.kick()
        job_id = org.store.get_job_by_index(batch, 0).job_id
        await until(lambda: org.store.latest_checkpoint(job_id) is not None, 20, "the save")
        kept = org.store.latest_checkpoint(job_id)
        assert kept is not None and (kept.attempt, kept.data) == (d.attempt, b"honest")
        # Once the result is in, a late checkpoint of that attempt is not kept.
        agent.finish(job)
        await until(lambda: bool(agent.of_type(ev.ResultCommitted)), 20, "the commit")
        _upload(agent, job, b"after the result")
        channel = agent.session.channel
        assert channel is not None
        await until(lambda: channel.send_idle, 20, "the server to acknowledge it")
        await org.server.committer.run(lambda: None)  # any save it caused has run
        kept = org.store.latest_checkpoint(job_id)
        assert kept is not None and kept.data == b"honest"
    finally:
        agent.close()
        await org.server.stop()
