"""SecureChannel: RESET and the committed notices ride the one recovery mechanism.

Two real channels (real keys, real AEAD); the test carries their datagrams and
decides which ones a "network" loses.
"""

from __future__ import annotations

import itertools

import pytest

from vcomp.protocol.channel import SecureChannel
from vcomp.protocol.messages import Ack, Code, Message, Reset, decode_body
from vcomp.protocol.record import Direction, RecordKey
from vcomp.protocol.reliability import GIVE_UP_AFTER, MAX_PROBE_TIMEOUTS
from vcomp.protocol.wire import HEADER_LEN, PacketType, unpack_header

KEY = bytes(range(32))
SESSION_ID = 0x0102_0304_0506_0708
NO_IDLE = 1e9  # these tests are about retransmission, not idle expiry


def channels(*, idle_timeout: float = NO_IDLE) -> tuple[SecureChannel, SecureChannel]:
    server = SecureChannel(
        session_id=SESSION_ID,
        key=KEY,
        send=Direction.SERVER_TO_AGENT,
        first_packet_number=0,
        window=64,
        now=0.0,
        idle_timeout=idle_timeout,
        keepalive=idle_timeout,
    )
    agent = SecureChannel(
        session_id=SESSION_ID,
        key=KEY,
        send=Direction.AGENT_TO_SERVER,
        first_packet_number=0,
        window=64,
        now=0.0,
        idle_timeout=idle_timeout,
        keepalive=idle_timeout,
    )
    return server, agent


def peek(datagram: bytes, sent_by: Direction) -> Message:
    """Decrypt a datagram the way its receiver would, to see what it carries."""
    header = unpack_header(datagram)
    receiver = RecordKey(KEY, send=sent_by.reverse)
    body = receiver.open(datagram[:HEADER_LEN], header.packet_number, datagram[HEADER_LEN:])
    return decode_body(header.ptype, body)


def deliver(datagrams: list[bytes], to: SecureChannel, now: float) -> list[Message]:
    out: list[Message] = []
    for datagram in datagrams:
        got = to.receive(unpack_header(datagram), datagram, now)
        out.extend(got or [])
    return out


def resets(datagrams: list[bytes]) -> int:
    return sum(unpack_header(d).ptype is PacketType.RESET for d in datagrams)


def commits(datagrams: list[bytes]) -> list[tuple[tuple[int, int], ...]]:
    found = []
    for datagram in datagrams:
        if unpack_header(datagram).ptype is PacketType.ACK:
            ack = peek(datagram, Direction.SERVER_TO_AGENT)
            assert isinstance(ack, Ack)
            if ack.committed:
                found.append(ack.committed)
    return found


def fire(channel: SecureChannel) -> tuple[float, list[bytes]]:
    """Jump to the channel's next deadline and run it; what it sends then."""
    deadline = channel.timer()
    assert deadline is not None
    channel.handle_timer(deadline)
    return deadline, channel.datagrams_to_send(deadline)


def test_a_lost_reset_is_resent_at_the_probe_timeout_until_acknowledged() -> None:
    server, agent = channels()
    server.start_reset("operator asked", 0.0)
    assert resets(server.datagrams_to_send(0.0)) == 1  # lost
    assert not server.send_idle
    now, again = fire(server)
    assert resets(again) == 1
    got = deliver(again, agent, now)
    assert [type(m) for m in got] == [Reset]
    assert agent.accept_reset(server.epoch)
    deliver(agent.datagrams_to_send(now + 0.01), server, now + 0.02)
    assert server.send_idle
    assert_only_keepalive_pending(server)


def test_a_lost_committed_notice_is_resent_until_acknowledged() -> None:
    server, agent = channels()
    server.send_committed([(7, 1), (8, 2)], 0.0)
    assert commits(server.datagrams_to_send(0.0)) == [((7, 1), (8, 2))]  # lost
    now, again = fire(server)
    assert commits(again) == [((7, 1), (8, 2))]
    got = deliver(again, agent, now)
    assert [m.committed for m in got if isinstance(m, Ack)] == [((7, 1), (8, 2))]
    deliver(agent.datagrams_to_send(now + 0.01), server, now + 0.02)
    assert server.unacknowledged_commits == 0
    assert_only_keepalive_pending(server)


def test_a_commit_announced_twice_is_sent_once() -> None:
    server, _ = channels()
    server.send_committed([(7, 1)], 0.0)
    server.send_committed([(7, 1), (9, 1)], 0.0)
    assert commits(server.datagrams_to_send(0.0)) == [((7, 1),), ((9, 1),)]
    assert server.unacknowledged_commits == 2


def test_committed_notices_outlive_a_reset() -> None:
    server, agent = channels()
    server.send_committed([(7, 1)], 0.0)
    server.start_reset("operator asked", 0.0)
    lost = server.datagrams_to_send(0.0)
    assert resets(lost) == 1 and commits(lost) == [((7, 1),)]
    now, again = fire(server)
    assert resets(again) == 1 and commits(again) == [((7, 1),)]
    deliver(again, agent, now)
    deliver(agent.datagrams_to_send(now + 0.01), server, now + 0.02)
    assert server.send_idle and server.unacknowledged_commits == 0


def test_a_superseded_reset_is_not_resent() -> None:
    server, _ = channels()
    server.start_reset("first", 0.0)
    server.start_reset("second", 0.0)
    server.datagrams_to_send(0.0)  # both lost
    _, again = fire(server)
    sent = [peek(d, Direction.SERVER_TO_AGENT) for d in again]
    assert [(m.epoch, m.reason) for m in sent if isinstance(m, Reset)] == [(2, "second")]


def test_acks_for_packets_never_sent_deliver_no_frame() -> None:
    """A hostile peer acking made-up packet numbers does not settle a RESET or a notice."""
    server, agent = channels()
    server.start_reset("operator asked", 0.0)
    server.send_committed([(7, 1)], 0.0)
    server.datagrams_to_send(0.0)  # lost; they were packet numbers 0 and 1
    # The agent's own stream, so its ACKs are real; they name server pns 1000..2000.
    bogus = Ack(ranges=((1000, 2000),), delay_us=0, committed=())
    agent._emit(bogus, 0.0)
    deliver(agent.datagrams_to_send(0.0), server, 0.0)
    assert not server.send_idle and server.unacknowledged_commits == 1
    _, again = fire(server)
    assert resets(again) == 1 and commits(again) == [((7, 1),)]


def assert_only_keepalive_pending(channel: SecureChannel) -> None:
    """No retransmission is scheduled: the next deadline is the (far) keepalive."""
    deadline = channel.timer()
    assert deadline is not None and deadline >= NO_IDLE / 3


def _probe_until_closed(server: SecureChannel) -> tuple[list[float], list[list[bytes]]]:
    times: list[float] = []
    sent: list[list[bytes]] = []
    while server.close_reason is None:
        now, out = fire(server)
        times.append(now)
        sent.append(out)
        assert times[-1] <= 2 * GIVE_UP_AFTER, "never gave up"
    return times, sent


def test_an_unacknowledged_reset_closes_the_session_by_the_one_give_up_rule() -> None:
    server, _ = channels()
    server.start_reset("operator asked", 0.0)
    server.datagrams_to_send(0.0)
    times, sent = _probe_until_closed(server)
    # Resent once per probe timeout, then given up at the one limit: more than
    # MAX_PROBE_TIMEOUTS expiries, and GIVE_UP_AFTER seconds since the RESET left.
    expiries = len(times)
    assert expiries > MAX_PROBE_TIMEOUTS
    assert sum(resets(out) for out in sent) == expiries - 1
    assert server.close_code == 40
    assert f"{expiries} probe timeouts" in (server.close_reason or "")
    assert times[-2] < GIVE_UP_AFTER <= times[-1]
    # The one backoff: before an RTT sample the PTO is 1 s, already the session's
    # cap, so every gap is between that and the cap (the jitter never goes below it).
    gaps = [b - a for a, b in itertools.pairwise([0.0, *times])]
    assert all(g == pytest.approx(1.0) for g in gaps)


def test_unacknowledged_commits_and_stream_share_one_give_up_rule() -> None:
    server, _ = channels()
    server.send_reliable(Code(job=1, attempt=1, offset=0, data=b"x" * 100))
    server.send_committed([(7, 1)], 0.0)
    server.datagrams_to_send(0.0)
    times, _ = _probe_until_closed(server)
    assert len(times) > MAX_PROBE_TIMEOUTS
    assert times[-2] < GIVE_UP_AFTER <= times[-1]
    assert server.close_code == 40


def test_the_agent_acknowledges_the_reset_it_accepts() -> None:
    """Packet numbers belong to the key, not the epoch: adopting the RESET's epoch
    must not forget that the RESET's own packet is owed an ACK."""
    server, agent = channels()
    server.start_reset("operator asked", 0.0)
    got = deliver(server.datagrams_to_send(0.0), agent, 0.001)
    assert [type(m) for m in got] == [Reset]
    assert agent.accept_reset(server.epoch)  # as AgentSession does, in the same receive
    deliver(agent.datagrams_to_send(0.01), server, 0.02)
    assert server.send_idle  # the first RESET was acknowledged: no retransmission needed
    assert_only_keepalive_pending(server)
