from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netsim import (
    A_TO_B,
    DataFrame,
    LinkConfig,
    Network,
    StreamEndpoint,
    decode_frame,
    encode_data,
)
from vcomp.errors import LimitExceeded, TransferFailed
from vcomp.protocol.reliability import (
    MAX_PROBE_TIMEOUTS,
    PROBE_COUNT,
    ReliableReceiver,
    ReliableSender,
)
from vcomp.protocol.rtt import SESSION_MAX_BACKOFF_PTO, session_timer


def send_all(sender: ReliableSender[str], now: float, pns: list[int]) -> list[tuple[int, int]]:
    """Send everything the sender offers; return (seq, pn) pairs."""
    out = []
    while (nxt := sender.next_to_send(now)) is not None:
        seq = nxt[0]
        pn = pns[0]
        pns[0] += 1
        sender.on_sent(seq, pn, now)
        out.append((seq, pn))
    return out


def filled(n: int, *, window: int = 64, max_retries: int = 8) -> ReliableSender[str]:
    sender: ReliableSender[str] = ReliableSender(window=window, max_retries=max_retries)
    for i in range(n):
        assert sender.push(f"item{i}") == i
    return sender


# ---- sender ------------------------------------------------------------------------


def test_push_assigns_consecutive_seqs_and_bounds_the_queue() -> None:
    sender: ReliableSender[str] = ReliableSender(max_queue=3)
    assert [sender.push(x) for x in "abc"] == [0, 1, 2]
    assert sender.queue_space == 0
    with pytest.raises(LimitExceeded, match="queue full"):
        sender.push("d")
    assert sender.next_to_send(0.0) == (0, "a")
    assert sender.queue_space == 1
    assert sender.push("d") == 3
    assert sender.next_seq == 4


def test_window_bounds_the_span_in_flight() -> None:
    sender = filled(10, window=3)
    pns = [0]
    assert send_all(sender, 0.0, pns) == [(0, 0), (1, 1), (2, 2)]
    assert sender.unacked == 3 and sender.in_flight == 3
    # Acking seq 1 does not open the window: seq 0 still holds its left edge.
    assert sender.on_ack([(1, 1)], 0.0, 0.1) == [1]
    assert sender.next_to_send(0.1) is None
    assert sender.on_ack([(0, 0)], 0.0, 0.1) == [0]
    assert send_all(sender, 0.1, pns) == [(3, 3), (4, 4)]


def test_window_one_is_stop_and_wait() -> None:
    sender = filled(3, window=1)
    pns = [0]
    for seq in range(3):
        assert send_all(sender, 0.0, pns) == [(seq, seq)]
        assert sender.next_to_send(0.0) is None
        assert sender.on_ack([(seq, seq)], 0.0, 0.01) == [seq]
    assert sender.idle
    assert sender.timer() is None


def test_ack_returns_each_seq_once_and_counts() -> None:
    sender = filled(4)
    send_all(sender, 0.0, [10])
    assert sender.on_ack([(10, 11)], 0.0, 0.05) == [0, 1]
    assert sender.on_ack([(10, 11)], 0.0, 0.06) == []
    assert sorted(sender.on_ack([(13, 13), (12, 12)], 0.0, 0.07)) == [2, 3]
    assert sender.idle
    stats = sender.stats
    assert stats["packets_sent"] == 4
    assert stats["packets_acked"] == 4
    assert stats["items_acked"] == 4
    assert stats["retransmissions"] == 0
    assert stats["srtt"] > 0


def test_packet_threshold_declares_loss_and_resends_under_new_numbers() -> None:
    sender = filled(8, window=8)
    pns = [0]
    send_all(sender, 0.0, pns)  # seqs 0..7 in pns 0..7
    assert sender.on_ack([(3, 4)], 0.0, 0.1) == [3, 4]
    # largest acked 4: pns 0 and 1 are >= 3 behind (lost), pn 2 only 2 behind.
    resent = send_all(sender, 0.1, pns)
    assert resent == [(0, 8), (1, 9)]
    assert sender.stats["packets_lost"] == 2
    assert sender.stats["retransmissions"] == 2
    # The retransmission's packet number acknowledges the seq.
    assert sender.on_ack([(8, 8)], 0.0, 0.2) == [0]


def test_time_threshold_declares_loss_at_the_loss_timer() -> None:
    sender = filled(8, window=8)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(2, 3)], 0.0, 0.1)  # pn 0 lost by threshold; pn 1 is only 2 behind
    assert [s for s, _ in send_all(sender, 0.1, pns)] == [0]
    deadline = sender.timer()
    assert deadline is not None
    # loss delay = 9/8 * max(srtt, latest_rtt) = 9/8 * 0.1 after pn 1's send time 0.0
    assert deadline == pytest.approx(1.125 * 0.1)
    sender.on_timeout(deadline - 1e-6)
    assert sender.next_to_send(deadline) is None
    sender.on_timeout(deadline)
    assert [s for s, _ in send_all(sender, deadline, pns)] == [1]


def test_rtt_sample_comes_from_the_largest_newly_acked_packet() -> None:
    sender = filled(2)
    sender.next_to_send(0.0)
    sender.on_sent(0, 0, 0.00)
    sender.next_to_send(0.0)
    sender.on_sent(1, 1, 0.02)
    sender.on_ack([(0, 1)], 0.0, 0.10)
    assert sender.rtt.latest_rtt == pytest.approx(0.08)


def test_a_late_ack_of_an_older_packet_gives_no_sample() -> None:
    sender = filled(2)
    send_all(sender, 0.0, [0])
    assert sender.on_ack([(1, 1)], 0.0, 0.050) == [1]
    assert sender.on_ack([(0, 0)], 0.0, 0.055) == [0]  # would be a 0.055 s sample
    assert sender.rtt.latest_rtt == pytest.approx(0.050)


def test_peer_ack_delay_is_subtracted() -> None:
    sender = filled(2, window=1)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 0)], 0.0, 0.050)
    send_all(sender, 0.050, pns)
    sender.on_ack([(1, 1)], 0.010, 0.130)  # raw 0.08, adjusted 0.07
    assert sender.rtt.latest_rtt == pytest.approx(0.08)
    assert sender.rtt.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.07)


def test_pto_probes_backs_off_and_resets_on_a_sample() -> None:
    sender = filled(3, window=4)
    pns = [0]
    send_all(sender, 0.0, pns)
    assert sender.timer() == pytest.approx(1.0)
    sender.on_timeout(0.5)  # early: nothing happens
    assert sender.next_to_send(0.5) is None
    sender.on_timeout(1.0)
    assert sender.rto == pytest.approx(2.0)
    assert [s for s, _ in send_all(sender, 1.0, pns)] == list(range(PROBE_COUNT))
    assert sender.timer() == pytest.approx(3.0)
    assert sender.stats["timeouts"] == 1
    sender.on_ack([(3, 3)], 0.0, 1.1)  # the probe of seq 0
    assert sender.rtt.backoff == 0
    # PTO = SRTT + 4 RTTVAR + max_ack_delay (RFC 9002, 6.2.1): 0.1 + 0.2 + 0.025
    assert sender.rto == pytest.approx(0.325)


def test_retry_limit_raises_a_clear_error() -> None:
    sender = filled(1, max_retries=3)
    pns = [0]
    now = 0.0
    send_all(sender, now, pns)
    with pytest.raises(TransferFailed) as info:
        for _ in range(10):
            deadline = sender.timer()
            assert deadline is not None
            now = deadline
            sender.on_timeout(now)
            send_all(sender, now, pns)
    message = str(info.value)
    assert "seq 0" in message
    assert "7 transmissions" in message  # the first, then two probes per PTO
    assert "4 probe timeouts" in message
    assert "max_retries=3" in message
    assert "unreachable" in message
    assert f"over {now:.3f} s" in message
    assert now == pytest.approx(1 + 2 + 4 + 8)


# ---- control frames (the same mechanism) ------------------------------------------


class FrameLog:
    """Delivery callbacks as the channel writes them: a lost frame is re-queued."""

    def __init__(self, sender: ReliableSender[str]) -> None:
        self.sender = sender
        self.fates: list[tuple[str, bool]] = []

    def __call__(self, payload: str, delivered: bool) -> None:
        self.fates.append((payload, delivered))
        if not delivered:
            self.sender.send_frame(payload, self)


def send_frames(sender: ReliableSender[str], now: float, pns: list[int]) -> list[tuple[str, int]]:
    out = []
    while (frame := sender.next_frame()) is not None:
        sender.on_frame_sent(frame, pns[0], now)
        out.append((frame.payload, pns[0]))
        pns[0] += 1
    return out


def test_an_acked_frame_is_delivered_once_and_needs_no_timer() -> None:
    sender: ReliableSender[str] = ReliableSender()
    log = FrameLog(sender)
    sender.send_frame("reset", log)
    pns = [0]
    assert send_frames(sender, 0.0, pns) == [("reset", 0)]
    assert sender.timer() == pytest.approx(sender.rto)
    sender.on_ack([(0, 0)], 0.0, 0.1)
    sender.on_ack([(0, 0)], 0.0, 0.2)  # a duplicate ACK delivers nothing more
    assert log.fates == [("reset", True)]
    assert sender.frames_pending == 0 and sender.timer() is None
    assert sender.rtt.srtt == pytest.approx(0.1)  # its ACK is an RTT sample like any other


def test_a_frame_lost_at_the_probe_timeout_is_requeued_by_its_callback() -> None:
    sender: ReliableSender[str] = ReliableSender()
    log = FrameLog(sender)
    sender.send_frame("commit", log)
    pns = [0]
    send_frames(sender, 0.0, pns)
    sender.on_ack([(5, 9)], 0.0, 0.5)  # acks nothing we sent
    assert log.fates == []
    deadline = sender.timer()
    assert deadline is not None
    sender.on_timeout(deadline)
    assert log.fates == [("commit", False)]
    assert send_frames(sender, deadline, pns) == [("commit", 1)]
    sender.on_ack([(0, 0)], 0.0, deadline + 0.1)  # the lost copy: already given up on
    assert log.fates == [("commit", False)]
    sender.on_ack([(1, 1)], 0.0, deadline + 0.1)
    assert log.fates == [("commit", False), ("commit", True)]


def test_frames_and_stream_items_share_the_probe_timer_and_its_backoff() -> None:
    sender = filled(1)
    log = FrameLog(sender)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.send_frame("reset", log)
    send_frames(sender, 0.0, pns)
    first = sender.timer()
    assert first is not None
    sender.on_timeout(first)
    # One timeout handled both: the item is probed, the frame re-queued, and the
    # PTO doubled once (not once per mechanism).
    assert log.fates == [("reset", False)]
    assert sender.rtt.backoff == 1
    assert [p for p, _ in send_frames(sender, first, pns)] == ["reset"]
    send_all(sender, first, pns)
    assert sender.timer() == pytest.approx(first + 2 * first)


def test_an_unacked_frame_gives_up_by_the_same_rule_as_the_stream() -> None:
    sender: ReliableSender[str] = ReliableSender(max_retries=3)
    log = FrameLog(sender)
    sender.send_frame("reset", log)
    pns = [0]
    send_frames(sender, 0.0, pns)
    timeouts = 0
    with pytest.raises(TransferFailed, match=r"4 probe timeouts .*max_retries=3"):
        while True:
            deadline = sender.timer()
            assert deadline is not None
            timeouts += 1
            sender.on_timeout(deadline)
            send_frames(sender, deadline, pns)
    assert timeouts == 4
    assert ReliableSender[str]().max_retries == MAX_PROBE_TIMEOUTS


def test_an_ack_of_a_frame_proves_the_peer_alive() -> None:
    sender: ReliableSender[str] = ReliableSender(max_retries=1)
    log = FrameLog(sender)
    pns = [0]
    for _ in range(5):  # each frame lost once, then acked: never two timeouts in a row
        sender.send_frame("commit", log)
        send_frames(sender, 0.0, pns)
        deadline = sender.timer()
        assert deadline is not None
        sender.on_timeout(deadline)
        sent = send_frames(sender, deadline, pns)
        sender.on_ack([(sent[0][1], sent[0][1])], 0.0, deadline + 0.01)
    assert log.fates.count(("commit", True)) == 5


def test_frames_outlive_a_new_stream() -> None:
    old: ReliableSender[str] = ReliableSender()
    log = FrameLog(old)
    old.send_frame("commit", log)
    pns = [0]
    send_frames(old, 0.0, pns)
    new: ReliableSender[str] = ReliableSender()
    new.adopt_frames(old)
    assert old.frames_pending == 0 and new.frames_pending == 1
    assert new.timer() is not None
    new.on_ack([(0, 0)], 0.0, 0.1)
    assert log.fates == [("commit", True)]


def test_fast_retransmits_do_not_count_against_the_retry_limit() -> None:
    sender = filled(20, window=20, max_retries=0)
    pns = [0]
    send_all(sender, 0.0, pns)
    for _ in range(5):  # seq 0 lost again and again, but ACKs keep arriving
        sender.on_ack([(pns[0] - 1, pns[0] - 1)], 0.0, 0.1)
        send_all(sender, 0.1, pns)
    assert sender.stats["retransmissions"] >= 5
    assert not sender.idle


def test_acks_for_unknown_numbers_are_ignored() -> None:
    sender = filled(4)
    pns = [100]
    send_all(sender, 0.0, pns)  # pns 100..103
    garbage = [(0, 99), (104, 1 << 64), (103, 101), (-5, -1), (1 << 70, 1 << 71)]
    assert sender.on_ack(garbage, 0.0, 0.1) == []
    assert sender.unacked == 4 and sender.in_flight == 4
    assert sender.rtt.srtt is None
    # A range that covers everything only matches what is really in flight.
    assert sender.on_ack([(0, (1 << 64) - 1)], 0.0, 0.1) == [0, 1, 2, 3]
    assert sender.on_ack([(0, (1 << 64) - 1)], 0.0, 0.1) == []


def test_on_sent_rejects_misuse() -> None:
    sender = filled(2)
    sender.next_to_send(0.0)
    sender.on_sent(0, 5, 0.0)
    with pytest.raises(ValueError, match="does not increase"):
        sender.on_sent(0, 5, 0.0)
    with pytest.raises(ValueError, match="never handed out"):
        sender.on_sent(7, 6, 0.0)


@pytest.mark.parametrize(("window", "max_queue", "max_retries"), [(0, 1, 0), (1, 0, 0), (1, 1, -1)])
def test_sender_configuration_is_checked(window: int, max_queue: int, max_retries: int) -> None:
    with pytest.raises(ValueError):
        ReliableSender[str](window=window, max_queue=max_queue, max_retries=max_retries)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_garbage_acks_never_break_the_senders_invariants(data: st.DataObject) -> None:
    window = data.draw(st.integers(min_value=1, max_value=8), label="window")
    total = data.draw(st.integers(min_value=1, max_value=30), label="items")
    sender = filled(total, window=window, max_retries=1000)
    pns = [data.draw(st.integers(min_value=0, max_value=1000), label="first pn")]
    number = st.one_of(
        st.integers(min_value=-3, max_value=pns[0] + 80),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
    )
    acked: set[int] = set()
    sent_pns: list[int] = []
    now = 0.0
    for _ in range(data.draw(st.integers(min_value=0, max_value=25), label="steps")):
        now += data.draw(st.floats(min_value=0.0, max_value=3.0), label="dt")
        action = data.draw(st.sampled_from(["send", "ack", "timeout"]), label="action")
        if action == "send":
            for seq, pn in send_all(sender, now, pns):
                assert seq not in acked
                sent_pns.append(pn)
        elif action == "ack":
            ranges = data.draw(st.lists(st.tuples(number, number), max_size=6), label="ranges")
            delay = data.draw(st.floats(allow_nan=True, allow_infinity=True), label="delay")
            newly = sender.on_ack(ranges, delay, now)
            assert len(newly) == len(set(newly))
            assert not acked & set(newly)
            assert all(0 <= s < sender.next_seq for s in newly)
            acked.update(newly)
        else:
            deadline = sender.timer()
            if deadline is not None:
                now = max(now, deadline)
                sender.on_timeout(now)
        assert sender.unacked <= window
        assert sender.unacked + sender.queued + len(acked) == total
        assert sender.in_flight <= len(sent_pns)
        if sender.unacked:
            assert sender.timer() is not None  # outstanding data always has a deadline
        rto = sender.rto
        # The PTO (RFC 9002, 6.2.1) has no 0.2 s floor: at least G + max_ack_delay.
        assert sender.rtt.granularity + sender.rtt.max_ack_delay <= rto <= 60.0
    # Whatever the garbage did, an honest peer still completes the transfer.
    for _ in range(4 * total + 10):
        if sender.idle:
            break
        sent_now = send_all(sender, now, pns)
        for seq, pn in sent_now:
            assert seq not in acked
            sent_pns.append(pn)
        deadline = sender.timer()
        if not sent_now and deadline is not None:
            # Paced (or waiting for a PTO): an honest driver waits for the timer.
            now = max(now, deadline)
            sender.on_timeout(now)
            continue
        now += 0.05
        acked.update(sender.on_ack([(pn, pn) for pn in sent_pns[-window * 4 :]], 0.0, now))
    assert sender.idle
    assert acked == set(range(total))


# ---- receiver ----------------------------------------------------------------------


def test_in_order_items_are_ready_at_once() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver()
    for i in range(5):
        receiver.on_packet(i, i, f"m{i}", 0.0)
    assert receiver.pop() == [f"m{i}" for i in range(5)]
    assert receiver.pop() == []
    assert receiver.expected_seq == 5


@given(st.permutations(range(30)), st.lists(st.integers(min_value=0, max_value=29)))
def test_reassembly_delivers_each_item_once_in_order(order: list[int], dups: list[int]) -> None:
    receiver: ReliableReceiver[int] = ReliableReceiver(max_buffer=64)
    out: list[int] = []
    arrivals = list(order)
    for i, seq in enumerate(dups):
        arrivals.insert((i * 7) % (len(arrivals) + 1), seq)
    for pn, seq in enumerate(arrivals):
        receiver.on_packet(pn, seq, seq * 10, 0.0)
        out.extend(receiver.pop())
    assert out == [seq * 10 for seq in range(30)]
    assert receiver.stats["duplicates"] == len(arrivals) - 30
    assert receiver.buffered == 0


def test_duplicates_are_dropped_but_acked_at_once() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(ack_every=10)
    receiver.on_packet(0, 0, "a", 0.0)
    receiver.build_ack(0.0)
    receiver.on_packet(1, 0, "a again", 1.0)  # a retransmission: our ACK was lost
    assert receiver.pop() == ["a"]
    assert receiver.should_ack_now(1.0)
    assert receiver.build_ack(1.0)[0] == [(0, 1)]
    assert receiver.stats["duplicates"] == 1


def test_items_beyond_the_buffer_are_dropped_unacked() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(max_buffer=4)
    receiver.on_packet(0, 1, "b", 0.0)
    receiver.on_packet(1, 4, "too far", 0.0)  # expected 0: seqs 0..3 fit
    receiver.on_packet(2, 1 << 63, "absurd", 0.0)
    assert receiver.build_ack(0.0)[0] == [(0, 0)]
    assert receiver.buffered == 1
    assert receiver.stats["dropped_over_buffer"] == 2


def test_an_application_that_never_pops_cannot_grow_the_buffer() -> None:
    receiver: ReliableReceiver[int] = ReliableReceiver(max_buffer=8)
    for seq in range(100):
        receiver.on_packet(seq, seq, seq, 0.0)
    assert receiver.buffered == 8
    ranges, _ = receiver.build_ack(0.0)
    assert ranges == [(0, 7)]  # the dropped ones stay unacked: the sender resends them
    assert receiver.pop() == list(range(8))
    receiver.on_packet(100, 8, 8, 0.0)
    assert receiver.pop() == [8]


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=(1 << 64) - 1),
            st.one_of(st.none(), st.integers(min_value=0, max_value=(1 << 64) - 1)),
        ),
        max_size=300,
    )
)
def test_hostile_packet_and_seq_numbers_stay_within_bounds(
    packets: list[tuple[int, int | None]],
) -> None:
    receiver: ReliableReceiver[int] = ReliableReceiver(max_buffer=16, max_ranges=8)
    for pn, seq in packets:
        receiver.on_packet(pn, seq, 0 if seq is not None else None, 0.0)
        assert receiver.buffered <= 16
    ranges, delay = receiver.build_ack(1.0)
    assert len(ranges) <= 8
    assert delay >= 0.0
    assert ranges == sorted(ranges, reverse=True)


def test_ack_every_second_packet_or_after_the_delay() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(ack_every=2, max_ack_delay=0.005)
    assert receiver.ack_deadline() is None
    receiver.on_packet(0, 0, "a", 1.0)
    assert receiver.ack_deadline() == pytest.approx(1.005)
    assert not receiver.should_ack_now(1.001)
    assert receiver.should_ack_now(1.005)
    receiver.on_packet(1, 1, "b", 1.002)
    assert receiver.should_ack_now(1.002)
    ranges, delay = receiver.build_ack(1.003)
    assert ranges == [(0, 1)]
    assert delay == pytest.approx(0.001)
    assert receiver.ack_deadline() is None


def test_ack_every_one_acks_each_packet() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(ack_every=1)
    receiver.on_packet(0, 0, "a", 1.0)
    assert receiver.should_ack_now(1.0)


def test_gaps_and_reordering_are_acked_at_once() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(ack_every=100)
    receiver.on_packet(7, 0, "a", 0.0)  # the first packet number may be anything
    assert not receiver.should_ack_now(0.0)
    receiver.on_packet(9, 2, "c", 0.0)  # pn 8 missing
    assert receiver.should_ack_now(0.0)
    receiver.build_ack(0.0)
    receiver.on_packet(8, 1, "b", 0.0)  # late: fills the gap
    assert receiver.should_ack_now(0.0)
    assert receiver.build_ack(0.0)[0] == [(7, 9)]
    assert receiver.pop() == ["a", "b", "c"]


def test_non_eliciting_packets_are_acked_only_in_passing() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(ack_every=1)
    receiver.on_packet(0, None, None, 0.0, ack_eliciting=False)
    receiver.on_packet(1, None, None, 0.0, ack_eliciting=False)
    assert receiver.ack_deadline() is None
    receiver.on_packet(2, None, None, 0.0)  # e.g. RESET: acked, outside the stream
    assert receiver.should_ack_now(0.0)
    assert receiver.build_ack(0.0)[0] == [(0, 2)]
    assert receiver.pop() == []


def test_build_ack_reports_the_newest_ranges_first() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver(max_ranges=3)
    for pn in (0, 2, 4, 6, 8):
        receiver.on_packet(pn, None, None, 0.0)
    assert receiver.build_ack(0.0)[0] == [(8, 8), (6, 6), (4, 4)]
    assert ReliableReceiver[str]().build_ack(0.0) == ([], 0.0)


def test_receiver_misuse() -> None:
    receiver: ReliableReceiver[str] = ReliableReceiver()
    with pytest.raises(ValueError):
        receiver.on_packet(0, 0, None, 0.0)
    with pytest.raises(ValueError):
        ReliableReceiver(ack_every=0)


# ---- end to end through the simulator --------------------------------------------

HOSTILE = LinkConfig(
    delay=0.010,
    jitter=0.002,
    loss=0.30,
    duplicate=0.05,
    reorder=0.10,
    reorder_delay=0.020,
    corrupt=0.01,
)


def make_pair(window: int, ack_every: int, max_retries: int) -> tuple[StreamEndpoint, ...]:
    return tuple(
        StreamEndpoint(
            ReliableSender(window=window, max_retries=max_retries),
            ReliableReceiver(ack_every=ack_every),
        )
        for _ in range(2)
    )


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Window 1 with 30% loss each way fails a round trip 51% of the time, so an item
# exhausts 8 retries with probability 0.51**9 = 0.24%: over ~1750 items that is
# likely. Stop-and-wait gets a retry budget that matches the path (0.51**21 ~ 1e-6).
# So does window 64: at 30% loss congestion control holds about 1.22 / sqrt(0.3) ~ 2
# packets in flight (RFC 9002 NewReno), so most repairs wait for a probe timeout too.
@pytest.mark.parametrize(
    ("window", "ack_every", "max_retries"), [(1, 1, 20), (64, 2, 20)], ids=["stop-and-wait", "w64"]
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_mib_arrive_intact_through_a_hostile_network(
    window: int, ack_every: int, max_retries: int, seed: int
) -> None:
    data = payload(2 << 20, seed)
    a, b = make_pair(window, ack_every, max_retries)
    widest = [0]

    def watch(direction: int, datagram: bytes) -> bytes:
        if direction == A_TO_B:
            widest[0] = max(widest[0], a.sender.unacked)
        return datagram

    net = Network(a, b, a_to_b=HOSTILE, seed=seed, tamper=watch)
    a.write(data)
    net.run(lambda: a.done_sending and len(b.received) == len(data))
    assert bytes(b.received) == data
    assert widest[0] <= window
    items = -(-len(data) // 1200)
    sent = a.sender.stats
    assert sent["items_acked"] == items
    assert sent["retransmissions"] > 0.2 * items  # the loss really happened
    assert net.stats_a_to_b.lost > 0 and net.stats_b_to_a.lost > 0
    assert net.stats_a_to_b.duplicated > 0 and net.stats_a_to_b.reordered > 0
    assert b.receiver.stats["duplicates"] > 0
    assert b.receiver.stats["items_delivered"] == items
    assert a.dropped_corrupt + b.dropped_corrupt > 0


def test_both_directions_at_once() -> None:
    up, down = payload(300_000, 10), payload(500_000, 11)
    a, b = make_pair(16, 2, 8)
    net = Network(a, b, a_to_b=HOSTILE, seed=7)
    a.write(up)
    b.write(down)
    net.run(lambda: a.done_sending and b.done_sending and len(a.received) == len(down))
    assert bytes(b.received) == up
    assert bytes(a.received) == down


@pytest.mark.parametrize("window", [1, 64])
def test_total_loss_fails_cleanly_after_the_retry_limit(window: int) -> None:
    a, b = make_pair(window, 2, 8)
    net = Network(a, b, a_to_b=LinkConfig(loss=1.0), b_to_a=LinkConfig(), seed=1)
    a.write(payload(100_000, 1))
    with pytest.raises(TransferFailed) as info:
        net.run(lambda: a.done_sending)
    message = str(info.value)
    # The first transmission, then at each of the 8 PTOs before the 9th two probes:
    # both of seq 0 when it is the only item in flight (window 1), else seq 0 and 1.
    sends = 1 + 8 * (PROBE_COUNT if window == 1 else 1)
    assert f"seq 0 was not acknowledged after {sends} transmissions over 243.000 s" in message
    assert "9 probe timeouts" in message
    assert "unreachable" in message
    # 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60 + 60: RFC 6298 backoff capped at 60 s.
    assert net.now == pytest.approx(243.0)
    assert a.sender.in_flight <= window + PROBE_COUNT * 9
    assert len(b.received) == 0


def test_lost_acks_alone_also_end_in_a_clean_failure() -> None:
    a, b = make_pair(4, 2, 3)
    net = Network(a, b, a_to_b=LinkConfig(), b_to_a=LinkConfig(loss=1.0), seed=1)
    a.write(payload(50_000, 2))
    with pytest.raises(TransferFailed, match="seq 0 was not acknowledged"):
        net.run(lambda: a.done_sending)
    assert len(b.received) == 4 * 1200  # the data arrived; only the ACKs never did


def test_corruption_is_dropped_like_an_aead_failure() -> None:
    link = LinkConfig(corrupt=0.2)
    a, b = make_pair(32, 2, 8)
    net = Network(a, b, a_to_b=link, seed=3)
    data = payload(200_000, 3)
    a.write(data)
    net.run(lambda: a.done_sending)
    assert bytes(b.received) == data
    assert b.dropped_corrupt > 0 and net.stats_a_to_b.corrupted > 0


def test_the_simulator_is_deterministic() -> None:
    def run(seed: int) -> tuple[object, ...]:
        a, b = make_pair(8, 2, 8)
        net = Network(a, b, a_to_b=HOSTILE, seed=seed)
        a.write(payload(100_000, 0))
        net.run(lambda: a.done_sending)
        return (net.now, net.stats_a_to_b, net.stats_b_to_a, tuple(a.sender.stats.items()))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_framing_round_trip_and_checksum() -> None:
    datagram = encode_data(7, 3, b"hello")
    assert decode_frame(datagram) == DataFrame(7, 3, b"hello")
    broken = bytearray(datagram)
    broken[-1] ^= 1
    assert decode_frame(bytes(broken)) is None
    assert decode_frame(b"") is None


def test_run_without_a_goal_stops_at_the_timeout_or_when_quiet() -> None:
    a, b = make_pair(4, 2, 8)
    net = Network(a, b, a_to_b=LinkConfig(loss=1.0), seed=1)
    a.write(b"x" * 5000)
    net.run(timeout=5.0)  # retransmission timers keep going: stop at 5 s
    assert net.now == 5.0
    assert a.sender.stats["timeouts"] == 2  # at 1 s and 3 s
    quiet = Network(*make_pair(4, 2, 8), seed=1)
    quiet.run()
    assert quiet.now == 0.0


# ---- many flows in one full queue: capped PTO, one probe at the cap, give-up time ------


def capped_sender(n: int, *, seed: int, give_up_after: float = 0.0) -> ReliableSender[str]:
    sender: ReliableSender[str] = ReliableSender(
        window=64, rtt=session_timer(random.Random(seed)), give_up_after=give_up_after
    )
    for i in range(n):
        sender.push(f"item{i}")
    return sender


def test_a_flow_that_lost_everything_probes_at_the_cap_and_recovers_soon_after() -> None:
    sender = capped_sender(50, seed=4, give_up_after=60.0)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 0)], 0.0, 0.08)  # one sample, then the rest of the flight is lost
    send_all(sender, 0.08, pns)
    probes_per_expiry = []
    now = 0.08
    for _ in range(30):  # 30 expiries in a row: the queue stays full, every probe lost
        deadline = sender.timer()
        assert deadline is not None
        assert deadline - now <= SESSION_MAX_BACKOFF_PTO + 1e-9  # never a long sleep
        now = deadline
        sender.on_timeout(now)
        probes_per_expiry.append(len(send_all(sender, now, pns)))
    # Two probes at the stall's first expiry (RFC 9002), one per expiry at the cap.
    assert probes_per_expiry[0] == PROBE_COUNT
    assert probes_per_expiry[-20:] == [1] * 20
    # The queue drains: the next probe is at most one capped PTO away, and its ACK
    # ends the backoff.
    deadline = sender.timer()
    assert deadline is not None and deadline - now <= SESSION_MAX_BACKOFF_PTO + 1e-9
    sender.on_timeout(deadline)
    ((_, pn),) = send_all(sender, deadline, pns)
    assert sender.on_ack([(pn, pn)], 0.0, deadline + 0.08)
    assert sender.rtt.backoff == 0


def test_giving_up_takes_the_count_and_the_time() -> None:
    sender = capped_sender(1, seed=5, give_up_after=60.0)
    pns = [0]
    send_all(sender, 0.0, pns)
    now, expiries = 0.0, 0
    with pytest.raises(TransferFailed, match="seq 0 was not acknowledged"):
        while True:
            deadline = sender.timer()
            assert deadline is not None
            now = deadline
            expiries += 1
            sender.on_timeout(now)
            send_all(sender, now, pns)
    # Capped at 1 s, MAX_PROBE_TIMEOUTS expiries are 12 s: the time floor decides.
    assert expiries > MAX_PROBE_TIMEOUTS
    assert 60.0 <= now <= 60.0 + SESSION_MAX_BACKOFF_PTO


def test_the_give_up_time_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="give_up_after"):
        ReliableSender[str](give_up_after=-1.0)
