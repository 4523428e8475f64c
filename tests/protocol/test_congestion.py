"""Congestion control, pacing and the probe timeout (RFC 9002 sections 6.2 and 7)."""

from __future__ import annotations

import itertools

import pytest

from vcomp.errors import ConfigError, TransferFailed
from vcomp.protocol.congestion import (
    MAX_DATAGRAM,
    PACING_GAIN,
    Cubic,
    NewReno,
    Pacer,
    initial_window,
    make_controller,
)
from vcomp.protocol.reliability import PROBE_COUNT, ReliableSender

MSS = MAX_DATAGRAM


def sender_with(items: int, *, window: int = 1024, **options: object) -> ReliableSender[int]:
    sender: ReliableSender[int] = ReliableSender(window=window, **options)  # type: ignore[arg-type]
    for i in range(items):
        sender.push(i)
    return sender


def send_all(sender: ReliableSender[int], now: float, pns: list[int]) -> list[int]:
    """Send what the sender allows now; return the packet numbers used."""
    used = []
    while (nxt := sender.next_to_send(now)) is not None:
        sender.on_sent(nxt[0], pns[0], now, MSS)
        used.append(pns[0])
        pns[0] += 1
    return used


def run_to_next_pto(sender: ReliableSender[int], pns: list[int]) -> float:
    """Honour the sender's timer (paced sends included) until a probe timeout fired."""
    timeouts = sender.stats["timeouts"]
    now = 0.0
    while sender.stats["timeouts"] == timeouts:
        deadline = sender.timer()
        assert deadline is not None
        now = deadline
        sender.on_timeout(now)
        send_all(sender, now, pns)
    return now


# ---- the controller alone ----------------------------------------------------------


def test_initial_window_is_ten_datagrams_capped_at_14720_bytes() -> None:
    assert initial_window(1200) == 12000
    assert initial_window(1472) == 14720
    assert initial_window(8000) == 16000  # at least two datagrams
    assert NewReno().cwnd == 14720


def test_slow_start_grows_by_every_acked_byte() -> None:
    cc = NewReno()
    for _ in range(10):
        cc.on_acked(1000, sent_at=0.0, now=0.1, app_limited=False)
    assert cc.cwnd == 14720 + 10_000


def test_a_loss_halves_the_window_once_per_recovery_period() -> None:
    cc = NewReno()
    cc.on_acked(5280, 0.0, 0.1, False)  # cwnd 20000
    cc.on_congestion(sent_at=0.5, now=1.0)
    assert (cc.cwnd, cc.ssthresh) == (10000, 10000)
    # More losses of packets sent before the recovery period began: no new reduction.
    cc.on_congestion(sent_at=0.9, now=1.1)
    cc.on_congestion(sent_at=1.0, now=1.2)
    assert cc.cwnd == 10000
    # ACKs of packets sent before it began do not grow the window either.
    cc.on_acked(MSS, 0.99, 1.2, False)
    assert cc.cwnd == 10000
    # A packet sent after recovery began and lost starts a new period: halve again.
    cc.on_congestion(sent_at=1.05, now=1.3)
    assert cc.cwnd == 5000


def test_congestion_avoidance_adds_one_datagram_per_window() -> None:
    cc = NewReno()
    cc.on_congestion(0.0, 0.0)  # ssthresh = cwnd = 7360
    start = cc.cwnd
    acked = 0
    while acked + MSS < start:
        cc.on_acked(MSS, 1.0, 1.1, False)
        acked += MSS
    assert cc.cwnd == start  # a whole window not yet acknowledged
    cc.on_acked(MSS, 1.0, 1.1, False)
    assert cc.cwnd == start + MSS


def test_application_limited_acks_do_not_grow_the_window() -> None:
    cc = NewReno()
    cc.on_acked(MSS, 0.0, 0.1, app_limited=True)
    assert cc.cwnd == initial_window()


def test_persistent_congestion_collapses_to_the_minimum_window() -> None:
    cc = NewReno()
    cc.on_persistent_congestion()
    assert cc.cwnd == 2 * MSS


def test_unknown_controller_is_a_config_error() -> None:
    assert isinstance(make_controller("cubic"), Cubic)
    assert type(make_controller("newreno")) is NewReno
    with pytest.raises(ConfigError, match="unknown congestion controller 'bbr'"):
        make_controller("bbr")


def test_cubic_reduces_by_beta_and_regrows_concavely_to_w_max() -> None:
    cc = Cubic()
    cc.on_acked(100 * MSS - initial_window(), 0.0, 0.0, False)  # slow start to 100 MSS
    assert cc.cwnd == 100 * MSS
    cc.on_congestion(sent_at=0.0, now=1.0)
    assert cc.cwnd == int(70 * MSS)  # beta = 0.7
    # K = cbrt(W_max (1 - beta) / C) = cbrt(30 / 0.4) ~ 4.2 s: the window is back
    # near W_max then, and grew fastest right after the reduction (concave).
    # At an RTT of 0.2 s the Reno-friendly estimate (0.53 MSS per RTT) stays below it.
    growth = []
    now = 1.0
    for _ in range(5):
        before = cc.cwnd
        end = now + 1.0
        while now < end:  # a window of ACKs per RTT
            now += 0.2
            for _ in range(cc.cwnd // MSS):
                cc.on_acked(MSS, now - 0.2, now, False)
        growth.append(cc.cwnd - before)
    assert 95 * MSS <= cc.cwnd <= 110 * MSS
    assert growth[0] > growth[3]  # concave: slower as it nears W_max


# ---- pacing --------------------------------------------------------------------------


def test_pacer_spaces_packets_at_cwnd_over_srtt_times_the_gain() -> None:
    pacer = Pacer(burst=2 * MSS)
    pacer.update_rate(cwnd=100 * MSS, srtt=1.0)  # 184 kB/s: a packet takes 8 ms
    assert pacer.rate == pytest.approx(PACING_GAIN * 100 * MSS / 1.0)
    now = 0.0
    departures = []
    for _ in range(20):
        while not pacer.can_send(MSS, now):
            assert pacer.next_send_time is not None and pacer.next_send_time > now
            now = pacer.next_send_time
        pacer.on_sent(MSS, now)
        departures.append(now)
    gaps = [b - a for a, b in itertools.pairwise(departures[2:])]
    assert gaps == pytest.approx([MSS / pacer.rate] * len(gaps), rel=1e-6)
    assert departures[:2] == [0.0, 0.0]  # the burst leaves at once


def test_at_high_rates_the_pacer_releases_a_millisecond_at_a_time() -> None:
    pacer = Pacer(burst=initial_window())
    pacer.update_rate(cwnd=100 * MSS, srtt=0.01)  # 18.4 MB/s: 18.4 kB per ms
    now = 0.0
    while pacer.can_send(MSS, now):  # drain the initial burst
        pacer.on_sent(MSS, now)
    wakeups, sent = 0, 0
    while sent < 100:
        assert pacer.next_send_time is not None
        now = pacer.next_send_time
        wakeups += 1
        while pacer.can_send(MSS, now):
            pacer.on_sent(MSS, now)
            sent += 1
    assert wakeups <= 100 // 9  # a millisecond of the rate (12 packets) per wake-up, not one
    assert sent * MSS / now == pytest.approx(pacer.rate, rel=0.15)  # still the rate


def test_nothing_is_paced_before_the_first_rtt_sample() -> None:
    sender = sender_with(10)
    assert len(send_all(sender, 0.0, [0])) == 10  # the whole initial window at once
    assert sender.timer() == pytest.approx(1.0)  # only the PTO


def test_the_sender_timer_says_when_the_next_paced_packet_may_leave() -> None:
    sender = sender_with(200)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 9)], 0.0, 0.1)  # srtt 0.1; slow start: cwnd 29440
    rate = sender.pacer.rate
    assert rate == pytest.approx(PACING_GAIN * sender.cc.cwnd / 0.1)
    sent = send_all(sender, 0.1, pns)
    assert 0 < len(sent) < 20  # a burst of the bucket, not the whole window
    paced_at = sender.timer()
    assert paced_at is not None and 0.1 < paced_at < 0.1 + 2 * MSS / rate
    assert send_all(sender, paced_at - 1e-4, pns) == []
    assert len(send_all(sender, paced_at, pns)) == 1


# ---- the sender: bytes in flight, app limit, persistent congestion ---------------------


def test_bytes_in_flight_never_exceed_the_congestion_window() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    assert sender.stats["bytes_in_flight"] == 10 * MSS == sender.cc.cwnd


def test_the_flow_control_window_still_bounds_the_span() -> None:
    sender = sender_with(100, window=4)
    send_all(sender, 0.0, [0])
    assert sender.unacked == 4 and sender.stats["bytes_in_flight"] == 4 * MSS < sender.cc.cwnd


def test_slow_start_through_the_sender_grows_cwnd_by_acked_bytes() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)  # cwnd-limited
    sender.on_ack([(0, 9)], 0.0, 0.05)
    assert sender.cc.cwnd == 20 * MSS


def test_a_sender_with_little_to_send_does_not_grow_cwnd() -> None:
    sender = sender_with(2)
    pns = [0]
    for round_ in range(5):
        send_all(sender, round_ * 0.1, pns)
        sender.on_ack([(0, pns[0] - 1)], 0.0, round_ * 0.1 + 0.05)
        sender.push(round_)
        sender.push(round_)
    assert sender.cc.cwnd == initial_window()


def test_one_loss_event_halves_cwnd_once() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    # pns 0-2 lost, 3-9 acked: three packets lost by the packet threshold, one event.
    # The ACK is processed first (slow start: +7 MSS), then the loss halves once.
    sender.on_ack([(3, 9)], 0.0, 0.05)
    assert sender.stats["packets_lost"] == 3
    assert sender.cc.cwnd == (initial_window() + 7 * MSS) // 2


def test_persistent_congestion_collapses_the_senders_window() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 9)], 0.0, 0.05)  # first RTT sample: srtt 0.05, rttvar 0.025
    first = pns[0]
    send_all(sender, 0.06, pns)  # a window, all of it lost
    # Three probe timeouts (0.175 s, then doubled): the probes are lost too.
    for _ in range(3):
        now = run_to_next_pto(sender, pns)
    last = pns[0] - 1
    # Persistent congestion lasts 3 x (0.05 + 0.1 + 0.025) = 0.525 s; these losses
    # span now - 0.06 > 1 s. An ACK of the newest probe declares the rest lost.
    assert now - 0.06 > 0.525
    sender.on_ack([(last, last)], 0.0, now + 0.05)
    assert sender.stats["packets_lost"] >= last - first - 2
    assert sender.cc.cwnd == 2 * MSS


def test_losses_within_one_pto_are_not_persistent_congestion() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 9)], 0.0, 0.05)
    send_all(sender, 0.06, pns)
    last = pns[0] - 1
    sender.on_ack([(last, last)], 0.0, 0.11)  # all but the newest lost, within 5 ms
    assert sender.stats["packets_lost"] > 2
    assert sender.cc.cwnd == 21 * MSS // 2  # 20 MSS, +1 for the ACK, halved: not collapsed


def test_an_optimistic_ack_cannot_grow_cwnd_beyond_what_was_sent() -> None:
    # A hostile peer acknowledges every packet number there is.
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    for _ in range(50):
        sender.on_ack([(0, (1 << 64) - 1)], 0.0, 0.05)
    assert sender.cc.cwnd == 20 * MSS  # grew by the 10 packets really sent, once


# ---- probe timeout -------------------------------------------------------------------


def test_pto_is_srtt_plus_four_rttvar_plus_max_ack_delay_from_the_last_send() -> None:
    sender = sender_with(1000, window=2)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 0)], 0.0, 0.1)  # srtt 0.1, rttvar 0.05
    send_all(sender, 0.2, pns)
    pto = 0.1 + 4 * 0.05 + sender.rtt.max_ack_delay
    assert sender.rtt.pto == pytest.approx(pto)
    assert sender.timer() == pytest.approx(0.2 + pto)


def test_a_tail_loss_is_probed_twice_past_the_congestion_window() -> None:
    sender = sender_with(1)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 0)], 0.0, 0.04)
    sender.push(1)
    send_all(sender, 0.05, pns)  # the tail packet, lost
    cwnd = sender.cc.cwnd
    deadline = sender.timer()
    assert deadline is not None
    sender.on_timeout(deadline)
    probes = send_all(sender, deadline, pns)
    assert len(probes) == PROBE_COUNT  # the one item, twice
    assert sender.cc.cwnd == cwnd  # a PTO declares nothing lost and keeps cwnd
    assert sender.stats["packets_lost"] == 0
    sender.on_ack([(probes[0], probes[0])], 0.0, deadline + 0.04)
    assert sender.idle


def test_probes_are_sent_even_when_cwnd_is_full() -> None:
    sender = sender_with(1000)
    pns = [0]
    send_all(sender, 0.0, pns)
    assert sender.next_to_send(0.0) is None  # cwnd full
    sender.on_timeout(1.0)
    assert len(send_all(sender, 1.0, pns)) == PROBE_COUNT


def test_giving_up_counts_ptos_in_a_row_and_an_ack_resets_the_count() -> None:
    sender = sender_with(10, max_retries=2)
    pns = [0]
    send_all(sender, 0.0, pns)
    for _ in range(2):
        now = run_to_next_pto(sender, pns)
    # The peer is alive: it acknowledges one probe. The count starts again.
    sender.on_ack([(pns[0] - 1, pns[0] - 1)], 0.0, now + 0.01)
    for _ in range(2):
        run_to_next_pto(sender, pns)
    with pytest.raises(TransferFailed, match="3 probe timeouts"):
        run_to_next_pto(sender, pns)


def test_probes_still_in_flight_after_their_item_was_acked_never_block_the_sender() -> None:
    # At the minimum window, the two probes of an item whose first transmission is
    # acked afterwards fill cwnd with packets no ACK may ever name (their ACK can be
    # lost, and nothing newer is sent). They must not block the next item forever.
    sender = sender_with(1)
    pns = [0]
    send_all(sender, 0.0, pns)
    sender.on_ack([(0, 0)], 0.0, 0.04)
    # cwnd = 2 datagrams in congestion avoidance, as on a very lossy path.
    sender.cc.on_persistent_congestion()
    sender.cc.on_congestion(sent_at=0.04, now=0.045)
    assert (sender.cc.cwnd, sender.cc.ssthresh) == (2 * MSS, MSS)
    sender.push(1)
    (first,) = send_all(sender, 0.05, pns)
    now = run_to_next_pto(sender, pns)  # two probes of seq 1 leave
    sender.on_ack([(first, first)], 0.0, now + 0.01)  # the first transmission's ACK
    assert sender.idle
    sender.push(2)
    sent: list[int] = []
    for _ in range(20):  # the peer answers nothing more: honour the timer only
        sent += send_all(sender, now, pns)
        if sent:
            break
        deadline = sender.timer()
        assert deadline is not None, "blocked by cwnd with no timer: a deadlock"
        now = deadline
        sender.on_timeout(now)
    assert sent, "the next item never left"
