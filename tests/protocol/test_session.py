"""Agent and server session machines end to end through the seeded simulator."""

from __future__ import annotations

import ast
import inspect
import os
import random
import re
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.netsim import LinkConfig, Network
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
from vcomp.errors import ConfigError
from vcomp.protocol import attestation, limits, server_endpoint, server_session
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol.agent_session import AgentSession, AgentState
from vcomp.protocol.congestion import Cubic
from vcomp.protocol.messages import (
    ErrorCode,
    Hello,
    Reject,
    decode_plaintext_packet,
    encode_plaintext_packet,
    pad_hello,
)
from vcomp.protocol.server_endpoint import ServerEndpoint
from vcomp.protocol.server_session import ServerState
from vcomp.protocol.wire import Flag, PacketType, unpack_header


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return make_identity(tmp_path_factory.mktemp("tpm"))


def jobs(n: int, code_size: int = 5000, input_size: int = 3000) -> list[SimJob]:
    return [
        SimJob(job=i + 1, attempt=1, code=os.urandom(code_size), data=os.urandom(input_size))
        for i in range(n)
    ]


def pair(identity: Identity, *, window: int = 64, **agent_kw: object) -> tuple[ServerApp, AgentApp]:
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity), window=window)
    agent = AgentApp(make_agent(identity, **agent_kw))  # type: ignore[arg-type]
    return server, agent


def test_handshake_then_jobs_on_a_clean_link(identity: Identity) -> None:
    server, agent = pair(identity)
    server.queue.extend(jobs(3))
    expected = {(j.job, j.attempt): job_output(j.code, j.data) for j in server.queue}
    net = Network(server, agent, seed=1)
    net.run(lambda: len(agent.of_type(ev.ResultCommitted)) == 3, timeout=60)
    assert server.results == expected
    assert agent.session.state is AgentState.READY
    established = server.of_type(ev.SessionEstablished)
    assert len(established) == 1 and established[0].agent_id == identity.tpm.agent_id
    assert server.endpoint.counters["retry_sent"] == 1


@pytest.mark.parametrize("window", [1, 64])
@pytest.mark.parametrize("seed", [3, 4])
def test_jobs_survive_loss_duplication_reordering_and_corruption(
    identity: Identity, window: int, seed: int
) -> None:
    link = LinkConfig(
        delay=0.002, loss=0.2, duplicate=0.05, reorder=0.1, reorder_delay=0.01, corrupt=0.02
    )
    server, agent = pair(identity, window=window)
    server.queue.extend(jobs(2, code_size=30_000, input_size=10_000))
    expected = {(j.job, j.attempt): job_output(j.code, j.data) for j in server.queue}
    net = Network(server, agent, a_to_b=link, b_to_a=link, seed=seed)
    net.run(lambda: len(agent.of_type(ev.ResultCommitted)) >= 2, timeout=600)
    assert server.results == expected
    assert all(count == 1 for count in server.commit_count.values())
    assert [e.description.job for e in agent.received] == [1, 2]


def test_a_cubic_server_delivers_through_a_lossy_link(identity: Identity) -> None:
    link = LinkConfig(delay=0.01, loss=0.05, duplicate=0.02, reorder=0.05, reorder_delay=0.01)
    server = ServerApp(
        signing_key=identity.signing_key, trust=make_trust(identity), congestion="cubic"
    )
    agent = AgentApp(make_agent(identity))
    server.queue.extend(jobs(3, code_size=200_000, input_size=1000))
    expected = {(j.job, j.attempt): job_output(j.code, j.data) for j in server.queue}
    net = Network(server, agent, a_to_b=link, b_to_a=link, seed=5)
    sessions = list(server.endpoint.sessions.values())

    def done() -> bool:
        sessions.extend(s for s in server.endpoint.sessions.values() if s not in sessions)
        return len(agent.of_type(ev.ResultCommitted)) >= 3

    net.run(done, timeout=600)
    assert server.results == expected
    channels = [s.channel for s in sessions if s.channel is not None]
    assert channels and all(type(ch._sender.cc) is Cubic for ch in channels)
    assert all(ch._sender.stats["packets_lost"] > 0 for ch in channels)


def test_an_unknown_congestion_controller_is_refused_at_start(identity: Identity) -> None:
    with pytest.raises(ConfigError, match="unknown congestion controller 'bbr'"):
        ServerApp(signing_key=identity.signing_key, trust=make_trust(identity), congestion="bbr")


def test_wrong_pinned_key_refuses_the_session_and_runs_nothing(identity: Identity) -> None:
    other = hs.key_fingerprint(hs.raw_public(Ed25519PrivateKey.generate()))
    server, agent = pair(identity, pinned=other)
    server.queue.extend(jobs(1))
    net = Network(server, agent, seed=2)
    net.run(lambda: agent.session.state is AgentState.CLOSED, timeout=60)
    rejected = agent.of_type(ev.Rejected)
    assert rejected and "pinned" in rejected[0].reason
    assert agent.received == []


@pytest.mark.parametrize(
    ("enrolled", "allowed", "reason"),
    [(False, True, "unknown_key"), (True, False, "measurement_not_allowed")],
)
def test_untrusted_agents_get_no_code(
    identity: Identity, enrolled: bool, allowed: bool, reason: str
) -> None:
    trust = make_trust(identity, enrolled=enrolled, allowed=allowed)
    server = ServerApp(signing_key=identity.signing_key, trust=trust)
    server.queue.extend(jobs(1))
    agent = AgentApp(make_agent(identity))
    net = Network(server, agent, seed=5)
    net.run(lambda: agent.session.state is AgentState.CLOSED, timeout=60)
    if enrolled:
        rejected = server.of_type(ev.HandshakeRejected)
        assert [r.reason for r in rejected] == [reason]
    else:
        # Refused at HELLO, before any session or public-key work (and no log event).
        assert [r.reason for r in agent.of_type(ev.Rejected)] == [reason]
        assert server.endpoint.counters["rejected_unknown_agent"] == 1
        assert server.endpoint.counters["sessions_created"] == 0
    assert agent.received == []
    assert not server.endpoint.sessions


def test_replayed_packets_have_no_effect(identity: Identity) -> None:
    server, agent = pair(identity)
    server.queue.extend(jobs(1))
    captured: list[tuple[int, bytes]] = []

    def capture(direction: int, datagram: bytes) -> bytes:
        captured.append((direction, datagram))
        return datagram

    net = Network(server, agent, seed=6, tamper=capture)
    net.run(lambda: len(agent.of_type(ev.ResultCommitted)) == 1, timeout=60)
    net.tamper = None
    for direction, datagram in captured:
        net.inject(direction, datagram)
    net.run(timeout=5)
    assert len(agent.received) == 1
    assert server.commit_count == {(1, 1): 1}
    assert len(server.of_type(ev.ResultComplete)) == 1


def test_a_reflected_packet_has_no_effect(identity: Identity) -> None:
    server, agent = pair(identity)
    server.queue.extend(jobs(1))
    from_server: list[bytes] = []
    net = Network(
        server,
        agent,
        seed=7,
        tamper=lambda d, data: (from_server.append(data) if d == 0 else None) or data,
    )
    net.run(lambda: len(agent.of_type(ev.ResultCommitted)) == 1, timeout=60)
    net.tamper = None
    before = len(server.events)
    for data in from_server:
        net.inject(1, data)  # server's own datagrams sent back to it
    net.run(timeout=5)
    assert [type(e) for e in server.events[before:]] == []


def test_every_single_bit_flip_in_an_encrypted_packet_is_dropped(identity: Identity) -> None:
    server, agent = pair(identity)
    server.queue.extend(jobs(1))
    net = Network(server, agent, seed=8)
    net.run(lambda: agent.session.state is AgentState.READY, timeout=60)
    sid = agent.session.session_id
    session = server.endpoint.session(sid)
    assert session is not None and session.channel is not None
    # Let the job flow, keeping one encrypted agent->server datagram.
    kept: list[bytes] = []

    def keep(direction: int, data: bytes) -> bytes:
        if direction == 1 and unpack_header(data).flags & Flag.ENCRYPTED and not kept:
            kept.append(data)
        return data

    net.tamper = keep
    net.run(lambda: len(agent.of_type(ev.ResultCommitted)) == 1, timeout=60)
    assert kept
    datagram = kept[0]
    events_before = len(server.events)
    for bit in range(len(datagram) * 8):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        server.endpoint.receive_datagram(bytes(flipped), server.address, net.now)
    server.endpoint.datagrams_to_send(net.now)
    assert server.endpoint.next_event() is None
    assert len(server.events) == events_before
    assert session.state is not ServerState.CLOSED


def test_reset_during_code_transfer_returns_the_agent_to_ready(identity: Identity) -> None:
    server, agent = pair(identity, window=4)
    big = SimJob(job=7, attempt=1, code=os.urandom(200_000), data=b"in")
    server.queue.append(big)
    net = Network(server, agent, seed=9)
    net.run(
        lambda: agent.session.state is AgentState.RECEIVING,
        timeout=60,
    )
    sid = agent.session.session_id
    session = server.endpoint.session(sid)
    assert session is not None
    session.reset("operator asked", net.now)
    server.endpoint.touch(sid)
    net.run(lambda: bool(server.of_type(ev.ResetDone)), timeout=60)
    aborted = agent.of_type(ev.JobAborted)
    assert [(a.job, a.attempt) for a in aborted] == [(7, 1)]
    # The same job, as a new attempt, then goes through on the new epoch.
    server.queue.append(SimJob(job=7, attempt=2, code=big.code, data=big.data))
    net.run(lambda: (7, 2) in server.results, timeout=120)
    assert server.results[(7, 2)] == job_output(big.code, big.data)
    assert agent.received[-1].description.attempt == 2


def test_hello_flood_without_cookie_creates_no_state(identity: Identity) -> None:
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    agent = make_agent(identity)
    agent.connect(0.0)
    hello = agent.datagrams_to_send(0.0)[0]
    assert len(hello) >= 1200
    for port in range(1000, 3000):
        server.endpoint.receive_datagram(hello, ("127.0.0.9", port), 0.1)
    replies = server.endpoint.datagrams_to_send(0.1)
    assert len(replies) == 2000
    assert all(len(d) < len(hello) for d, _ in replies)
    assert {unpack_header(d).ptype for d, _ in replies} == {PacketType.RETRY}
    assert server.endpoint.sessions == {}
    assert server.endpoint.counters["public_key_ops"] == 0
    # A HELLO that is too short is not answered at all.
    server.endpoint.receive_datagram(hello[:600], ("127.0.0.9", 1), 0.2)
    assert server.endpoint.datagrams_to_send(0.2) == []


def test_forged_cookie_is_not_accepted(identity: Identity) -> None:
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    agent = AgentApp(make_agent(identity))
    # The agent's address changes between RETRY and the second HELLO: the cookie
    # was bound to the first address, so the server sends a new RETRY instead.
    addresses = iter([("127.0.0.3", 1), ("127.0.0.4", 2), ("127.0.0.4", 2)])

    class Moving(ServerApp):
        pass

    def receive(datagram: bytes, now: float) -> None:
        server.endpoint.receive_datagram(datagram, next(addresses, ("127.0.0.4", 2)), now)

    server.receive = receive  # type: ignore[method-assign]
    net = Network(server, agent, seed=10)
    net.run(lambda: agent.session.state is AgentState.READY, timeout=60)
    assert server.endpoint.counters["cookie_invalid"] == 1


def test_idle_sessions_expire_on_both_sides(identity: Identity) -> None:
    server, agent = pair(identity)
    net = Network(server, agent, seed=11)
    net.run(lambda: agent.session.state is AgentState.READY, timeout=60)
    # Keepalives hold the session open while both sides are reachable.
    net.run(timeout=200)
    assert agent.session.state is AgentState.READY
    assert len(server.endpoint.sessions) == 1
    # Cut both directions: each side closes on its own idle timer.
    net.tamper = lambda d, data: None
    net.run(
        lambda: agent.session.state is AgentState.CLOSED and not server.endpoint.sessions,
        timeout=200,
    )
    closed = agent.of_type(ev.SessionClosed)
    assert closed and "idle" in closed[0].reason


def test_unused_paths_are_quiet(tmp_path: Path) -> None:
    # Garbage to a fresh server produces nothing and no state.
    identity = make_identity(tmp_path)
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    for size in (0, 1, 23, 24, 100, 1472, 1500):
        server.endpoint.receive_datagram(os.urandom(size), ("127.0.0.5", 9), 0.0)
    assert server.endpoint.datagrams_to_send(0.0) == []
    assert server.endpoint.sessions == {}


def _handshake(
    endpoint: ServerEndpoint, agent: AgentSession, address: tuple[str, int], now: float
) -> list[ev.Event]:
    """Pump datagrams between one agent and the endpoint until the handshake settles."""
    agent.connect(now)
    events: list[ev.Event] = []
    for _ in range(20):
        for datagram in agent.datagrams_to_send(now):
            endpoint.receive_datagram(datagram, address, now)
        for datagram, to in endpoint.datagrams_to_send(now):
            if to == address:
                agent.receive_datagram(datagram, now)
        while (e := agent.next_event()) is not None:
            events.append(e)
        if any(isinstance(e, ev.Connected | ev.Rejected) for e in events):
            break
    return events


def test_one_agent_gets_at_most_its_session_cap(identity: Identity) -> None:
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity),
        code_source=lambda *_: b"",
        now=0.0,
        max_sessions_per_agent=2,
    )
    outcomes = []
    for port in range(1, 5):
        events = _handshake(endpoint, make_agent(identity), ("127.0.0.5", port), 0.1)
        outcomes.append(next(e for e in events if isinstance(e, ev.Connected | ev.Rejected)))
    assert [type(e) for e in outcomes] == [ev.Connected, ev.Connected, ev.Rejected, ev.Rejected]
    rejected = [e for e in outcomes if isinstance(e, ev.Rejected)]
    assert all(e.code == ErrorCode.BUSY and e.reason == "too_many_sessions" for e in rejected)
    # Refused at HELLO, before any public-key work: two verified quotes in all.
    assert endpoint.counters["public_key_ops"] == 2
    assert endpoint.counters["rejected_agent_sessions"] == 2
    # A session that ends frees its place.
    first = next(iter(endpoint.sessions.values()))
    first.close("bye", ErrorCode.INTERNAL, 0.2)
    endpoint.touch(first.session_id)
    endpoint.datagrams_to_send(0.2)
    events = _handshake(endpoint, make_agent(identity), ("127.0.0.5", 9), 0.3)
    assert any(isinstance(e, ev.Connected) for e in events)


def test_concurrent_handshakes_past_the_cap_are_refused_before_the_quote_check(
    identity: Identity,
) -> None:
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity),
        code_source=lambda *_: b"",
        now=0.0,
        max_sessions_per_agent=1,
    )
    agents = [(make_agent(identity), ("127.0.0.6", port)) for port in (1, 2)]
    attests: list[tuple[bytes, tuple[str, int]]] = []
    for agent, address in agents:  # both get their CHALLENGE before either attests
        agent.connect(0.1)
        for _ in range(4):
            for datagram in agent.datagrams_to_send(0.1):
                if unpack_header(datagram).ptype is PacketType.ATTEST:
                    attests.append((datagram, address))
                else:
                    endpoint.receive_datagram(datagram, address, 0.1)
            for datagram, to in endpoint.datagrams_to_send(0.1):
                if to == address:
                    agent.receive_datagram(datagram, 0.1)
    assert len(attests) == 2
    for datagram, address in attests:
        endpoint.receive_datagram(datagram, address, 0.2)
    replies = endpoint.datagrams_to_send(0.2)
    kinds = {to: unpack_header(d).ptype for d, to in replies}
    assert kinds == {agents[0][1]: PacketType.KEY, agents[1][1]: PacketType.REJECT}
    assert endpoint.counters["public_key_ops"] == 1  # the second quote was never checked


def _half_open(endpoint: ServerEndpoint, identity: Identity, address: tuple[str, int]) -> str:
    """An enrolled agent's handshake that never sends its ATTEST: ``challenge`` if the
    server allocated a session, else the REJECT reason."""
    agent = make_agent(identity)
    agent.connect(0.1)
    for _ in range(4):
        for datagram in agent.datagrams_to_send(0.1):
            if unpack_header(datagram).ptype is not PacketType.ATTEST:
                endpoint.receive_datagram(datagram, address, 0.1)
        for datagram, to in endpoint.datagrams_to_send(0.1):
            if to != address:
                continue
            if unpack_header(datagram).ptype is PacketType.CHALLENGE:
                return "challenge"
            agent.receive_datagram(datagram, 0.1)
        rejected = [e for e in iter(agent.next_event, None) if isinstance(e, ev.Rejected)]
        if rejected:
            assert rejected[0].code == ErrorCode.BUSY
            return rejected[0].reason
    raise AssertionError("the handshake did not settle")


def test_half_open_handshakes_are_capped_apart_from_sessions(identity: Identity) -> None:
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity),
        code_source=lambda *_: b"",
        now=0.0,
        max_sessions=2,
        max_sessions_per_agent=2,
        max_pending_handshakes=20,
    )
    # Per source IP address: 16, then REJECT BUSY (and not past max_sessions = 2, nor
    # the claimed id's cap of 2: half-open handshakes count for neither).
    one_ip = [_half_open(endpoint, identity, ("127.0.0.7", port)) for port in range(1, 18)]
    assert one_ip == ["challenge"] * 16 + ["too_many_handshakes"]
    # An honest agent of the same key is not refused "server full" because of them.
    events = _handshake(endpoint, make_agent(identity), ("127.0.0.8", 1), 0.2)
    assert any(isinstance(e, ev.Connected) for e in events), events
    # Server-wide: 20 half-open in all.
    other_ip = [_half_open(endpoint, identity, ("127.0.0.9", port)) for port in range(1, 6)]
    assert other_ip == ["challenge"] * 4 + ["too_many_handshakes"]
    assert endpoint.counters["rejected_handshakes"] == 2
    assert endpoint.counters["rejected_busy"] == 0


def test_a_hello_for_an_id_not_enrolled_gets_no_session(identity: Identity) -> None:
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity, enrolled=False),
        code_source=lambda *_: b"",
        now=0.0,
    )
    events = _handshake(endpoint, make_agent(identity), ("127.0.0.10", 1), 0.1)
    rejected = [e for e in events if isinstance(e, ev.Rejected)]
    assert [(e.code, e.reason) for e in rejected] == [(ErrorCode.ATTESTATION_FAILED, "unknown_key")]
    assert endpoint.counters["sessions_created"] == 0 and not endpoint.sessions


def test_a_result_larger_than_the_send_queue_is_delivered_whole(identity: Identity) -> None:
    """6 MiB is 5,243 chunks, more than the stream's 4,096-place queue: they go in as
    the path takes them (this raised LimitExceeded in submit_result before)."""
    output = os.urandom(6 << 20)
    server, agent = pair(identity)
    agent.compute = lambda code, data: output
    server.queue.extend(jobs(1))
    Network(server, agent, seed=21).run(lambda: bool(server.results), timeout=600)
    assert list(server.results.values()) == [output]


def test_an_unsupported_version_is_rejected_with_its_token_before_any_cookie(
    identity: Identity,
) -> None:
    """PROTOCOL.md 7.3: the version check comes first, on a HELLO without a cookie too;
    the REJECT's reason is the token ``unsupported_version`` (section 6.1), no free text."""
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity),
        code_source=lambda *_: b"",
        now=0.0,
    )
    for cookie in (b"", b"\x01" * 20):  # no cookie, and a cookie that is not valid
        hello = pad_hello(
            Hello(versions=(2, 4), agent=identity.tpm.agent_id, nonce=os.urandom(32), cookie=cookie)
        )
        endpoint.receive_datagram(encode_plaintext_packet(hello, 0, 0), ("127.0.0.11", 1), 0.1)
        replies = endpoint.datagrams_to_send(0.1)
        assert len(replies) == 1
        header, reject = decode_plaintext_packet(replies[0][0])
        assert (header.ptype, header.session_id) == (PacketType.REJECT, 0)
        assert isinstance(reject, Reject)
        assert reject.code == ErrorCode.UNSUPPORTED_VERSION
        assert reject.reason == "unsupported_version"
    assert endpoint.counters["retry_sent"] == 0 and not endpoint.sessions


def _two_pending_attests(
    identity: Identity, host: str
) -> tuple[ServerEndpoint, list[tuple[bytes, tuple[str, int]]]]:
    """A server of one session, and two agents' ATTESTs held back after CHALLENGE."""
    endpoint = ServerEndpoint(
        signing_key=identity.signing_key,
        trust=make_trust(identity),
        code_source=lambda *_: b"",
        now=0.0,
        max_sessions=1,
        max_sessions_per_agent=4,
    )
    agents = [(make_agent(identity), (host, port)) for port in (1, 2)]
    attests: list[tuple[bytes, tuple[str, int]]] = []
    for agent, address in agents:
        agent.connect(0.1)
        for _ in range(4):
            for datagram in agent.datagrams_to_send(0.1):
                if unpack_header(datagram).ptype is PacketType.ATTEST:
                    attests.append((datagram, address))
                else:
                    endpoint.receive_datagram(datagram, address, 0.1)
            for datagram, to in endpoint.datagrams_to_send(0.1):
                if to == address:
                    agent.receive_datagram(datagram, 0.1)
    return endpoint, attests


def test_a_full_server_rejects_with_the_server_full_token(identity: Identity) -> None:
    """BUSY at HELLO and at ATTEST both carry the token ``server_full``."""
    # Two handshakes reach CHALLENGE while the server is empty; the first ATTEST fills it.
    endpoint, attests = _two_pending_attests(identity, "127.0.0.12")
    assert len(attests) == 2
    reasons = []
    for datagram, address in attests:
        endpoint.receive_datagram(datagram, address, 0.2)
        for reply, _ in endpoint.datagrams_to_send(0.2):
            if unpack_header(reply).ptype is PacketType.REJECT:
                reasons.append(decode_plaintext_packet(reply)[1])
    # A third agent's HELLO finds the server full.
    events = _handshake(endpoint, make_agent(identity), ("127.0.0.12", 3), 0.3)
    reasons += [Reject(code=e.code, reason=e.reason) for e in events if isinstance(e, ev.Rejected)]
    assert reasons == [Reject(code=ErrorCode.BUSY, reason="server_full")] * 2


def _reasons_sent(module: ModuleType) -> dict[str, str]:
    """REJECT reason tokens a module's source can send, with the function sending them:
    the first argument of AttestationError, _reject and refuse_handshake, and Reject's
    ``reason``, where it is a string literal or a module constant."""
    tree = ast.parse(inspect.getsource(module))
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        args: list[ast.expr] = []
        if name in {"AttestationError", "_reject", "refuse_handshake"} and node.args:
            args.append(node.args[0])
        if name == "Reject":
            args += [k.value for k in node.keywords if k.arg == "reason"]
        for arg in args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found[arg.value] = name
            elif isinstance(arg, ast.Name) and isinstance(getattr(module, arg.id, None), str):
                found[getattr(module, arg.id)] = name
    return found


def test_the_spec_lists_every_reject_reason_the_server_sends() -> None:
    """PROTOCOL.md section 6.1 is the whole vocabulary of REJECT reasons, no more, no less."""
    spec = (Path(__file__).resolve().parents[2] / "protocol" / "PROTOCOL.md").read_text()
    section = spec.split("### 6.1 REJECT reasons", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([A-Z_]+) ", section, re.MULTILINE)
    published = {token: ErrorCode[code] for token, code in rows}
    assert len(published) == len(rows) >= 15
    sent: dict[str, str] = {}
    for module in (attestation, server_endpoint, server_session):
        sent |= _reasons_sent(module)
    assert sent.keys() == published.keys()
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", token) for token in published)
    # Every verifier reason goes out with ATTESTATION_FAILED.
    verifier = {t for t, name in _reasons_sent(attestation).items() if name == "AttestationError"}
    assert {published[t] for t in verifier} == {ErrorCode.ATTESTATION_FAILED}


def test_a_small_server_keeps_the_nonce_of_every_pending_handshake(identity: Identity) -> None:
    """Outstanding CHALLENGE nonces are bounded apart from sessions (attestation.md 8):
    a server of max_sessions = 1 with two handshakes pending once evicted the older
    nonce, and the honest agent that attested first was refused ``nonce_reused``."""
    endpoint, attests = _two_pending_attests(identity, "127.0.0.13")
    first_attest, first_address = attests[0]
    endpoint.receive_datagram(first_attest, first_address, 0.2)
    [(reply, _)] = endpoint.datagrams_to_send(0.2)
    assert unpack_header(reply).ptype is PacketType.KEY, decode_plaintext_packet(reply)[1]


def _seeded_agent(identity: Identity, seed: int) -> AgentSession:
    return AgentSession(
        agent_id=identity.tpm.agent_id,
        pinned_server=identity.fingerprint,
        quote=lambda extra, pcrs: identity.tpm.quote(extra, pcrs),
        now=0.0,
        rng=random.Random(seed),
    )


def _attest_retries(identity: Identity, seed: int, *, lose_first_hello: bool) -> list[float]:
    """Run the handshake to ATTEST over a 40 ms path, then lose every ATTEST: the
    agent's retransmission times."""
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    agent = _seeded_agent(identity, seed)
    address = ("127.0.0.9", 4000)
    agent.connect(0.0)
    now = 0.0
    if lose_first_hello:
        agent.datagrams_to_send(now)
        now = agent.get_timer() or 0.0
        agent.handle_timer(now)
    while agent.state is not AgentState.ATTEST_SENT:
        for datagram in agent.datagrams_to_send(now):
            server.endpoint.receive_datagram(datagram, address, now)
        now += 0.040
        for datagram, _ in server.endpoint.datagrams_to_send(now):
            agent.receive_datagram(datagram, now)
    sent_at = now
    agent.datagrams_to_send(now)  # the ATTEST, lost
    times = []
    for _ in range(12):
        deadline = agent.get_timer()
        assert deadline is not None
        agent.handle_timer(deadline)
        assert len(agent.datagrams_to_send(deadline)) == 1  # the same ATTEST again
        times.append(deadline - sent_at)
        sent_at = deadline
    return times


def test_handshake_retransmission_uses_the_measured_rtt_jittered_within_bounds(
    identity: Identity,
) -> None:
    gaps = _attest_retries(identity, 1, lose_first_hello=False)
    # Two 40 ms samples (HELLO -> RETRY, HELLO with cookie -> CHALLENGE): SRTT 0.04,
    # RTTVAR 0.015, so RFC 9002's PTO is 0.04 + 4 * 0.015 + 0.025.
    pto = 0.040 + 4 * 0.015 + 0.025
    assert gaps[0] == pytest.approx(pto)  # the first wait: no backoff, no jitter
    assert all(pto - 1e-9 <= g <= limits.HANDSHAKE_RETRANSMIT_MAX for g in gaps)
    assert len({round(g, 6) for g in gaps[4:]}) > 4  # jittered at the cap: not in step
    assert _attest_retries(identity, 1, lose_first_hello=False) == gaps  # seeded
    assert _attest_retries(identity, 2, lose_first_hello=False) != gaps


def test_an_answer_to_a_retransmitted_hello_gives_no_rtt_sample(identity: Identity) -> None:
    gaps = _attest_retries(identity, 3, lose_first_hello=True)
    # Karn: the RETRY may answer either HELLO, so it gives no sample; the HELLO with
    # the cookie, sent once, gives the only one: PTO = 3 * 0.04 + 0.025, not 0.125.
    assert gaps[0] == pytest.approx(3 * 0.040 + 0.025)
    assert all(g <= limits.HANDSHAKE_RETRANSMIT_MAX for g in gaps)


def test_an_instant_forged_answer_cannot_make_the_handshake_retry_fast_for_long(
    identity: Identity,
) -> None:
    """An on-path forger answers HELLO at once (a 0 ms RTT sample), then drops all:
    the agent's retransmissions still back off to the 1-2 s cap, and the attempt
    ends at HANDSHAKE_GIVE_UP. Judged by the datagrams the agent sent."""
    server = ServerApp(signing_key=identity.signing_key, trust=make_trust(identity))
    agent = _seeded_agent(identity, 9)
    address = ("127.0.0.9", 4000)
    agent.connect(0.0)
    for datagram in agent.datagrams_to_send(0.0):
        server.endpoint.receive_datagram(datagram, address, 0.0)
    answers = server.endpoint.datagrams_to_send(0.0)
    assert answers
    for datagram, _ in answers:
        agent.receive_datagram(datagram, 0.0)  # answered in 0 s
    sent = len(agent.datagrams_to_send(0.0))
    now = 0.0
    while not agent.closed:
        deadline = agent.get_timer()
        assert deadline is not None
        now = deadline
        agent.handle_timer(now)
        sent += len(agent.datagrams_to_send(now))
    print(f"\nforged instant answer: {sent} handshake datagrams until give-up at {now:.1f} s")
    assert limits.HANDSHAKE_GIVE_UP <= now <= limits.HANDSHAKE_GIVE_UP + 2.0
    # The backoff from a 25 ms PTO passes 7 doublings before the cap, then at least
    # 1 s apart (half the 2 s cap): about 35 datagrams at most in 30 s, not hundreds.
    assert sent <= 8 + limits.HANDSHAKE_GIVE_UP / (limits.HANDSHAKE_RETRANSMIT_MAX / 2)
