"""Checkpoints over the wire (vcomp/3): START's resume state after the input, and
CHECKPOINT uploads, through both session machines and the seeded simulator; then a
hostile enrolled agent's malformed uploads, judged by what the server kept."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest

from tests.netsim import LinkConfig, Network
from tests.protocol.sessionsim import (
    AgentApp,
    Identity,
    ServerApp,
    SimJob,
    make_agent,
    make_identity,
    make_trust,
)
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentSession
from vcomp.protocol.messages import Checkpoint, ErrorCode

LOSSY = LinkConfig(loss=0.05)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return make_identity(tmp_path_factory.mktemp("tpm"))


def pair(identity: Identity, **agent: object) -> tuple[ServerApp, AgentApp]:
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    return server, AgentApp(make_agent(identity), **agent)  # type: ignore[arg-type]


def job(**kw: object) -> SimJob:
    return SimJob(job=7, attempt=3, code=os.urandom(3000), data=os.urandom(2000), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 1200, 50_000])
def test_the_resume_state_arrives_after_the_input(identity: Identity, size: int) -> None:
    state = os.urandom(size)
    server, agent = pair(identity)
    server.queue.append(job(resume=state, resume_attempt=2))
    Network(server, agent, a_to_b=LOSSY, b_to_a=LOSSY, seed=5).run(
        lambda: bool(server.results), timeout=120
    )
    [received] = agent.received
    assert received.resume == state
    assert received.description.resume_attempt == 2
    assert len(received.code) == 3000 and len(received.input) == 2000


def test_no_resume_state_is_none(identity: Identity) -> None:
    server, agent = pair(identity)
    server.queue.append(job())
    Network(server, agent, seed=6).run(lambda: bool(server.results), timeout=60)
    assert agent.received[0].resume is None


def test_a_resume_state_that_does_not_match_start_is_refused(identity: Identity) -> None:
    server, agent = pair(identity)
    lying = job(resume=b"the real state", resume_attempt=1)
    server.queue.append(lying)
    # The server's store handed out other bytes than the digest it announced.
    original = server._code

    def corrupt(job_id: int, attempt: int, offset: int, length: int) -> bytes:
        data = bytearray(original(job_id, attempt, offset, length))
        if offset + length > 5000:
            data[-1] ^= 1
        return bytes(data)

    server.endpoint._code_source = corrupt
    Network(server, agent, seed=7).run(lambda: bool(server.of_type(ev.JobRefused)), timeout=60)
    [refused] = server.of_type(ev.JobRefused)
    assert refused.code == ErrorCode.HASH_MISMATCH and "resume" in refused.message
    assert agent.received == []


def test_checkpoints_upload_when_start_offers_them(identity: Identity) -> None:
    states = [os.urandom(5000), b"", os.urandom(100)]
    server, agent = pair(identity, checkpoint_states=states)
    server.queue.append(job(checkpoint_bytes=8192))
    Network(server, agent, a_to_b=LOSSY, b_to_a=LOSSY, seed=8).run(
        lambda: len(server.checkpoints) == 3 and bool(server.results), timeout=120
    )
    assert agent.checkpoints_taken == [True, True, True]
    assert server.checkpoints == [((7, 3), s) for s in states]


def test_no_checkpoint_is_sent_unless_offered_or_within_the_bound(identity: Identity) -> None:
    server, agent = pair(identity, checkpoint_states=[b"x" * 10, b"y" * 4097, b"z" * 4096])
    server.queue.append(job(checkpoint_bytes=4096))
    other_server, other_agent = pair(identity, checkpoint_states=[b"state"])
    other_server.queue.append(job())  # offers none
    Network(server, agent, seed=9).run(lambda: bool(server.results), timeout=60)
    Network(other_server, other_agent, seed=9).run(lambda: bool(other_server.results), timeout=60)
    assert agent.checkpoints_taken == [True, False, True]
    assert [len(s) for _, s in server.checkpoints] == [10, 4096]
    assert other_agent.checkpoints_taken == [False] and other_server.checkpoints == []


# ---- a hostile enrolled agent --------------------------------------------------------


def _sends(*messages: Callable[[ev.JobDescription], Checkpoint]) -> Callable[..., None]:
    def hostile(session: AgentSession, e: ev.JobReceived) -> None:
        assert session.channel is not None
        for make in messages:
            session.channel.send_reliable(make(e.description))

    return hostile


def _chunk(d: ev.JobDescription, offset: int, total: int, data: bytes) -> Checkpoint:
    return Checkpoint(
        job=d.job, attempt=d.attempt, offset=offset, total=total, data=data, fin=False
    )


def _fin(d: ev.JobDescription, total: int, digest: bytes) -> Checkpoint:
    return Checkpoint(
        job=d.job, attempt=d.attempt, offset=total, total=total, data=b"", fin=True, sha256=digest
    )


HOSTILE = {
    "over the offered bound": (
        _sends(lambda d: _chunk(d, 0, 9000, b"a" * 1000)),
        "CHECKPOINT of 9000 bytes",
    ),
    "not starting at offset 0": (
        _sends(lambda d: _chunk(d, 1000, 3000, b"a" * 1000)),
        "out of order",
    ),
    "a gap between chunks": (
        _sends(lambda d: _chunk(d, 0, 3000, b"a" * 1000), lambda d: _chunk(d, 2000, 3000, b"b")),
        "does not continue",
    ),
    "a SHA-256 that does not match": (
        _sends(
            lambda d: _chunk(d, 0, 4, b"abcd"),
            lambda d: _fin(d, 4, hashlib.sha256(b"abce").digest()),
        ),
        "SHA-256",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_malformed_upload_closes_the_session_and_keeps_nothing(
    identity: Identity, case: str
) -> None:
    hostile, reason = HOSTILE[case]
    server, agent = pair(identity, while_running=hostile, run_jobs=False)
    server.queue.append(job(checkpoint_bytes=8192))
    Network(server, agent, seed=10).run(lambda: bool(server.of_type(ev.SessionClosed)), timeout=60)
    [closed] = server.of_type(ev.SessionClosed)
    assert closed.code == ErrorCode.PROTOCOL_VIOLATION and reason in closed.reason
    assert server.checkpoints == []


def test_an_upload_for_another_job_is_ignored(identity: Identity) -> None:
    def other_job(d: ev.JobDescription) -> Checkpoint:
        return Checkpoint(
            job=d.job + 1, attempt=d.attempt, offset=0, total=3, data=b"abc", fin=False
        )

    server, agent = pair(identity, while_running=_sends(other_job))
    server.queue.append(job(checkpoint_bytes=8192))
    Network(server, agent, seed=11).run(lambda: bool(server.results), timeout=60)
    assert server.checkpoints == [] and not server.of_type(ev.CheckpointChunk)
    assert not server.of_type(ev.SessionClosed)


def test_an_upload_when_none_was_offered_closes_the_session(identity: Identity) -> None:
    """Even an empty one: each would cost the server a store write."""

    def empty(d: ev.JobDescription) -> Checkpoint:
        return _fin(d, 0, hashlib.sha256(b"").digest())

    server, agent = pair(identity, while_running=_sends(empty), run_jobs=False)
    server.queue.append(job())
    Network(server, agent, seed=12).run(lambda: bool(server.of_type(ev.SessionClosed)), timeout=60)
    [closed] = server.of_type(ev.SessionClosed)
    assert closed.code == ErrorCode.PROTOCOL_VIOLATION and "not offered" in closed.reason
    assert server.checkpoints == []


def test_a_big_checkpoint_never_holds_up_the_result(identity: Identity) -> None:
    """A 4 MiB checkpoint, then at once a 2 MiB result: the checkpoint, not yet sent
    whole, is dropped for the result, and the next job's checkpoint starts cleanly."""
    output = os.urandom(2 << 20)
    server, agent = pair(
        identity, checkpoint_states=[os.urandom(4 << 20)], compute=lambda c, d: output
    )
    server.queue.extend(
        SimJob(job=j, attempt=1, code=b"c", data=b"d", checkpoint_bytes=8 << 20) for j in (1, 2)
    )
    Network(server, agent, seed=13).run(lambda: len(server.results) == 2, timeout=600)
    assert server.results == {(1, 1): output, (2, 1): output}
    assert agent.checkpoints_taken == [True, True]
    assert not server.of_type(ev.SessionClosed)
