"""SecureChannel: RESET and the committed notices ride the one recovery mechanism.

Two real channels (real keys, real AEAD); the test carries their datagrams and
decides which ones a "network" loses.
"""

from __future__ import annotations

import itertools

import pytest

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol.channel import SecureChannel
from vcomp.protocol.messages import Ack, Code, Message, Reset, decode_body
from vcomp.protocol.record import Direction, RecordKey
from vcomp.protocol.reliability import GIVE_UP_AFTER, MAX_PROBE_TIMEOUTS
from vcomp.protocol.wire import HEADER_LEN, Header, PacketType, unpack_header

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


# ---- the train data path ----------------------------------------------------------


def test_send_code_puts_the_same_bytes_on_the_wire_as_a_code_message() -> None:
    by_fields, _ = channels()
    by_message, _ = channels()
    for i in range(40):
        data = bytes([i]) * (1200 - i)
        assert by_fields.send_code(9, 2, 1200 * i, data) == i
        by_message.send_reliable(Code(job=9, attempt=2, offset=1200 * i, data=data))
    sent = by_fields.datagrams_to_send(0.0)
    assert 1 < len(sent) < 40  # what the initial congestion window allows: one train
    assert sent == by_message.datagrams_to_send(0.0)
    assert peek(sent[3], Direction.SERVER_TO_AGENT) == Code(
        seq=3, epoch=0, job=9, attempt=2, offset=3600, data=bytes([3]) * 1197
    )


def test_a_corrupted_datagram_inside_a_train_is_dropped_alone_and_resent() -> None:
    server, agent = channels()
    for i in range(8):
        server.send_code(1, 1, 100 * i, bytes([i]) * 100)
    train = server.datagrams_to_send(0.0)
    assert len(train) == 8
    bad = bytearray(train[4])
    bad[HEADER_LEN + 10] ^= 0x01
    train[4] = bytes(bad)
    got = deliver(train, agent, 0.001)
    # 0..3 in order; 5..7 wait for 4, which failed authentication and was not acked.
    assert [m.offset for m in got if isinstance(m, Code)] == [0, 100, 200, 300]
    assert agent.forgeries == 1
    deliver(agent.datagrams_to_send(0.001), server, 0.002)
    resent = server.datagrams_to_send(0.002)
    assert [peek(d, Direction.SERVER_TO_AGENT) for d in resent] == [
        Code(seq=4, epoch=0, job=1, attempt=1, offset=400, data=bytes([4]) * 100)
    ]
    got = deliver(resent, agent, 0.003)
    assert [m.offset for m in got if isinstance(m, Code)] == [400, 500, 600, 700]
    assert server.close_reason is None and agent.close_reason is None


def test_a_code_that_breaks_the_rules_is_refused_when_queued() -> None:
    server, _ = channels()
    with pytest.raises(DecodeError):
        server.send_code(1, 1, 0, b"")
    assert server.next_seq == 0 and server.queued == 0
    assert server.send_code(1, 1, 0, b"x") == 0


def as_train(datagrams: list[bytes]) -> list[tuple[Header, bytes]]:
    return [(unpack_header(d), d) for d in datagrams]


def test_a_train_sealed_in_one_flush_opens_as_one_train_or_packet_by_packet() -> None:
    server, by_train = channels()
    _, by_packet = channels()
    for i in range(8):
        server.send_code(1, 1, 100 * i, bytes([i]) * 100)
    train = server.datagrams_to_send(0.0)
    got = by_train.receive_train(as_train(train), 0.001)
    assert got == deliver(train, by_packet, 0.001)
    assert [m.offset for m in got or () if isinstance(m, Code)] == [100 * i for i in range(8)]
    # Both owe the same ACK for the same packets.
    assert [peek(d, Direction.AGENT_TO_SERVER) for d in by_train.datagrams_to_send(0.001)] == [
        peek(d, Direction.AGENT_TO_SERVER) for d in by_packet.datagrams_to_send(0.001)
    ]


def test_forged_and_replayed_datagrams_in_a_train_are_dropped_alone() -> None:
    server, agent = channels()
    for i in range(6):
        server.send_code(1, 1, 10 * i, bytes([i]) * 10)
    train = server.datagrams_to_send(0.0)
    forged = bytearray(train[1])
    forged[-1] ^= 0x80  # the tag
    hostile = [train[0], bytes(forged), train[2], train[2], train[0], *train[3:]]
    got = agent.receive_train(as_train(hostile), 0.001)
    # 0 at once; 2..5 wait for 1, which is sent again and then releases them.
    assert [m.offset for m in got or () if isinstance(m, Code)] == [0]
    assert agent.forgeries == 1
    assert agent.receive_train(as_train([train[0], bytes(forged)]), 0.002) is None
    deliver(agent.datagrams_to_send(0.002), server, 0.003)
    got = agent.receive_train(as_train(server.datagrams_to_send(0.003)), 0.004)
    assert [m.offset for m in got or () if isinstance(m, Code)] == [10, 20, 30, 40, 50]
    assert agent.close_reason is None


def test_an_undecodable_packet_in_a_train_closes_the_channel_and_stops_there() -> None:
    server, agent = channels()
    server.send_code(1, 1, 0, b"a")
    server._push(PacketType.CODE, b"\x80", server.next_seq)  # an authentic, empty map
    server.send_code(1, 1, 2, b"c")
    got = agent.receive_train(as_train(server.datagrams_to_send(0.0)), 0.001)
    assert [m.offset for m in got or () if isinstance(m, Code)] == [0]
    assert agent.close_code == 1 and "undecodable CODE" in (agent.close_reason or "")


def test_a_first_packet_number_the_header_could_not_carry_is_refused() -> None:
    for bad in (-1, 2**64 - 1):
        with pytest.raises(LimitExceeded):
            SecureChannel(
                session_id=SESSION_ID,
                key=KEY,
                send=Direction.SERVER_TO_AGENT,
                first_packet_number=bad,
                window=64,
                now=0.0,
            )
