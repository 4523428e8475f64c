"""The session transition tables, and sessions fed events out of order."""

from __future__ import annotations

import hashlib
import itertools
import os
from enum import Enum

import pytest

from tests.netsim import Network
from tests.protocol.sessionsim import (
    AgentApp,
    Identity,
    ServerApp,
    SimJob,
    job_output,
    make_agent,
    make_identity,
    make_trust,
)
from vcomp.errors import IllegalTransition
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentState
from vcomp.protocol.messages import Code, End, ErrorCode, Start
from vcomp.protocol.server_session import ServerSession, ServerState
from vcomp.protocol.states import AGENT, SERVER, AgentEvent, Machine, ServerEvent

MACHINES: list[
    tuple[
        Machine[AgentState, AgentEvent] | Machine[ServerState, ServerEvent], type[Enum], type[Enum]
    ]
] = [
    (AGENT, AgentState, AgentEvent),
    (SERVER, ServerState, ServerEvent),
]


@pytest.mark.parametrize(("machine", "states", "events"), MACHINES, ids=["agent", "server"])
def test_every_pair_outside_the_table_is_rejected_with_a_specific_error(
    machine: Machine[Enum, Enum], states: type[Enum], events: type[Enum]
) -> None:
    illegal = 0
    for state, event in itertools.product(states, events):
        if (state, event) in machine.table:
            assert machine.next(state, event) is machine.table[state, event]
            assert machine.allows(state, event)
            continue
        illegal += 1
        assert not machine.allows(state, event)
        with pytest.raises(IllegalTransition) as info:
            machine.next(state, event)
        assert str(info.value) == (
            f"{machine.name}: {event.name} is not allowed in state {state.name}"
        )
    assert illegal > 0


@pytest.mark.parametrize(("machine", "states", "events"), MACHINES, ids=["agent", "server"])
def test_closed_is_final_and_every_state_is_reachable(
    machine: Machine[Enum, Enum], states: type[Enum], events: type[Enum]
) -> None:
    closed = states["CLOSED"]
    assert not any(machine.allows(closed, event) for event in events)
    start = next(iter(states))
    seen = {start}
    frontier = [start]
    while frontier:
        state = frontier.pop()
        for event in events:
            if machine.allows(state, event) and (nxt := machine.next(state, event)) not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(states)
    # And every state but CLOSED can end.
    assert all(machine.allows(s, events["CLOSE"]) for s in states if s is not closed)


# ---- real sessions, events out of order ---------------------------------------------


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return make_identity(tmp_path_factory.mktemp("tpm"))


def established(identity: Identity) -> tuple[ServerApp, AgentApp, Network, ServerSession]:
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    agent = AgentApp(make_agent(identity))
    net = Network(server, agent, seed=3)
    net.run(lambda: bool(server.of_type(ev.AgentIdle)), timeout=60)
    session = server.endpoint.session(agent.session.session_id)
    assert session is not None and session.state is ServerState.IDLE
    return server, agent, net, session


def start_of(job: SimJob) -> Start:
    d = job.description()
    return Start(
        job=d.job,
        attempt=d.attempt,
        kind=d.kind,
        code_size=d.code_size,
        code_sha256=d.code_sha256,
        input_size=d.input_size,
        input_sha256=d.input_sha256,
        cpu_seconds=d.cpu_seconds,
        memory_bytes=d.memory_bytes,
        wall_seconds=d.wall_seconds,
        output_bytes=d.output_bytes,
        disk_bytes=d.disk_bytes,
    )


def test_a_hostile_server_sending_job_messages_out_of_order_gets_refused_and_no_crash(
    identity: Identity,
) -> None:
    """The server's session key is real; what it sends is in the wrong order."""
    server, agent, net, session = established(identity)
    ch = session.channel
    assert ch is not None

    def push(*messages: Start | Code | End) -> None:
        for message in messages:
            ch.send_reliable(message)
        server.endpoint.touch(session.session_id)
        net.run(lambda: ch.send_idle, timeout=60)

    # CODE and END with no START: dropped (they look like a refused job's late chunks).
    push(
        Code(job=99, attempt=1, offset=0, data=b"x" * 10),
        End(job=99, attempt=1, total=10),
    )
    assert agent.session.state is AgentState.READY
    assert agent.received == []

    # A second START while the first job is still arriving: refused, BUSY, naming the state.
    first = SimJob(job=5, attempt=1, code=os.urandom(3000), data=os.urandom(500))
    second = SimJob(job=6, attempt=1, code=b"c", data=b"d")
    push(start_of(first), start_of(second))
    assert agent.session.state is AgentState.RECEIVING
    net.run(lambda: bool(server.of_type(ev.JobRefused)), timeout=60)
    [refused] = server.of_type(ev.JobRefused)
    assert (refused.job, refused.attempt, refused.code) == (6, 1, ErrorCode.BUSY)
    assert "state receiving" in refused.message

    # END before the last chunk: refused as a size mismatch, the agent is READY again.
    blob = first.code + first.data
    push(Code(job=5, attempt=1, offset=0, data=blob[:1000]), End(job=5, attempt=1, total=len(blob)))
    net.run(lambda: len(server.of_type(ev.JobRefused)) == 2, timeout=60)
    assert server.of_type(ev.JobRefused)[1].code == ErrorCode.SIZE_MISMATCH
    assert agent.session.state is AgentState.READY
    assert agent.received == []

    # The session still works: an in-order job arrives and runs.
    chunks = [
        Code(job=5, attempt=1, offset=o, data=blob[o : o + 1000]) for o in range(0, len(blob), 1000)
    ]
    push(start_of(first), *chunks, End(job=5, attempt=1, total=len(blob)))
    net.run(lambda: (5, 1) in server.results, timeout=60)
    assert server.results[(5, 1)] == job_output(first.code, first.data)
    assert agent.session.state is AgentState.READY
    assert session.state is not ServerState.CLOSED
    assert not agent.of_type(ev.SessionClosed)


def test_leasing_a_second_job_to_a_busy_session_is_an_illegal_transition(
    identity: Identity,
) -> None:
    server, _, net, session = established(identity)
    job = SimJob(job=1, attempt=1, code=os.urandom(2000), data=b"in")
    server.jobs[(1, 1)] = job
    session.start_job(job.description())
    other = SimJob(job=2, attempt=1, code=b"c", data=hashlib.sha256(b"x").digest())
    with pytest.raises(IllegalTransition, match="START_JOB is not allowed in state SENDING_JOB"):
        session.start_job(other.description())
    # Nothing about the first job changed.
    assert session.current_job == (1, 1)
    server.endpoint.touch(session.session_id)
    net.run(lambda: (1, 1) in server.results, timeout=60)
    assert server.results[(1, 1)] == job_output(job.code, job.data)
