from __future__ import annotations

import math
import random

import pytest

from vcomp.protocol import limits
from vcomp.protocol.rtt import (
    SESSION_MAX_BACKOFF_PTO,
    RttEstimator,
    handshake_timer,
    session_timer,
)


def test_defaults_before_any_sample() -> None:
    rtt = RttEstimator()
    assert rtt.rto == 1.0  # RFC 6298 (2.1)
    assert rtt.srtt is None
    assert rtt.loss_delay() == 1.0


def test_first_sample() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.100)
    assert rtt.srtt == pytest.approx(0.100)
    assert rtt.rttvar == pytest.approx(0.050)
    # RTO = SRTT + max(G, 4 * RTTVAR) = 0.1 + 0.2
    assert rtt.rto == pytest.approx(0.300)


def test_second_sample_uses_the_old_srtt_for_rttvar() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.100)
    rtt.on_sample(0.200)
    # RTTVAR = 3/4 * 0.05 + 1/4 * |0.1 - 0.2| = 0.0625
    # SRTT   = 7/8 * 0.1 + 1/8 * 0.2       = 0.1125
    assert rtt.rttvar == pytest.approx(0.0625)
    assert rtt.srtt == pytest.approx(0.1125)
    assert rtt.rto == pytest.approx(0.1125 + 0.25)
    rtt.on_sample(0.100)
    # RTTVAR = 3/4 * 0.0625 + 1/4 * 0.0125 = 0.05
    # SRTT   = 7/8 * 0.1125 + 1/8 * 0.1    = 0.1109375
    assert rtt.rttvar == pytest.approx(0.05)
    assert rtt.srtt == pytest.approx(0.1109375)
    assert rtt.rto == pytest.approx(0.3109375)


def test_granularity_term_when_variance_is_tiny() -> None:
    rtt = RttEstimator(min_rto=0.001, granularity=0.05)
    for _ in range(200):
        rtt.on_sample(0.010)
    assert rtt.rttvar < 0.001
    assert rtt.rto == pytest.approx(0.010 + 0.05, rel=1e-3)


def test_min_rto_floor_and_max_rto_cap() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.001)
    assert rtt.rto == 0.2  # our default floor (RFC 6298 says 1 s; see the module docstring)
    rtt = RttEstimator(min_rto=1.0)
    rtt.on_sample(0.001)
    assert rtt.rto == 1.0
    rtt = RttEstimator()
    rtt.on_sample(100.0)
    assert rtt.rto == 60.0


def test_backoff_doubles_caps_and_a_new_sample_resets_it() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.100)  # RTO 0.3
    expected = [0.6, 1.2, 2.4, 4.8, 9.6, 19.2, 38.4, 60.0, 60.0]
    for value in expected:
        rtt.on_timeout()
        assert rtt.rto == pytest.approx(value)
    assert rtt.backoff == len(expected)
    rtt.on_sample(0.100)
    assert rtt.backoff == 0
    assert rtt.rto < 0.6


def test_backoff_from_the_initial_rto() -> None:
    rtt = RttEstimator()
    seen = []
    for _ in range(8):
        rtt.on_timeout()
        seen.append(rtt.rto)
    assert seen == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_initial_rto_override_is_clamped() -> None:
    assert RttEstimator(initial_rto=0.3).rto == pytest.approx(0.3)
    assert RttEstimator(initial_rto=0.05).rto == pytest.approx(0.2)
    assert RttEstimator(initial_rto=500.0).rto == 60.0


def test_ack_delay_is_subtracted_but_bounded() -> None:
    rtt = RttEstimator(max_ack_delay=0.025)
    rtt.on_sample(0.050)  # first sample: min_rtt = 0.05
    rtt.on_sample(0.100, ack_delay=0.010)  # adjusted 0.09
    assert rtt.latest_rtt == pytest.approx(0.100)
    assert rtt.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.09)
    # A huge claimed delay only counts up to max_ack_delay.
    a, b = RttEstimator(), RttEstimator()
    for est in (a, b):
        est.on_sample(0.050)
    a.on_sample(0.200, ack_delay=10.0)
    b.on_sample(0.200 - 0.025)
    assert a.srtt == pytest.approx(b.srtt)


def test_ack_delay_never_pushes_a_sample_below_min_rtt() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.050)
    rtt.on_sample(0.060, ack_delay=0.020)  # 0.04 would be below min_rtt 0.05: not adjusted
    assert rtt.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.06)


@pytest.mark.parametrize("delay", [-1.0, math.nan, -math.inf])
def test_garbage_ack_delay_counts_as_zero(delay: float) -> None:
    a, b = RttEstimator(), RttEstimator()
    for est in (a, b):
        est.on_sample(0.050)
    a.on_sample(0.080, ack_delay=delay)
    b.on_sample(0.080)
    assert a.srtt == pytest.approx(b.srtt)
    assert a.rto == pytest.approx(b.rto)


@pytest.mark.parametrize("sample", [-0.001, math.nan])
def test_invalid_samples_are_ignored(sample: float) -> None:
    rtt = RttEstimator()
    rtt.on_sample(sample)
    assert rtt.srtt is None
    assert rtt.rto == 1.0


def test_loss_delay_is_nine_eighths_of_the_larger_rtt() -> None:
    rtt = RttEstimator()
    rtt.on_sample(0.100)
    rtt.on_sample(0.200)  # srtt 0.1125, latest 0.2
    assert rtt.loss_delay() == pytest.approx(1.125 * 0.2)
    rtt = RttEstimator(granularity=0.01)
    rtt.on_sample(0.0)
    assert rtt.loss_delay() == 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_rto": 0.0},
        {"min_rto": 2.0, "max_rto": 1.0},
        {"initial_rto": 0.0},
        {"granularity": -1.0},
        {"max_ack_delay": -1.0},
    ],
)
def test_bad_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RttEstimator(**kwargs)


# ---- the session's backed-off PTO: capped and jittered --------------------------------


def test_session_pto_stops_doubling_at_the_cap_and_jitter_stays_within_bounds() -> None:
    rtt = session_timer(random.Random(1))
    rtt.on_sample(0.080)  # base PTO = 0.08 + 4 * 0.04 + 0.025 = 0.265
    base = rtt.base_pto
    assert rtt.pto == pytest.approx(0.265)  # no backoff: RFC 9002 exactly
    seen = []
    for k in range(1, 40):
        rtt.on_timeout()
        # Never below the PTO without backoff, never above the cap (1 s here).
        assert base <= rtt.pto <= max(SESSION_MAX_BACKOFF_PTO, base)
        assert rtt.pto <= base * 2**k
        seen.append(rtt.pto)
    assert rtt.backoff_capped
    assert len(set(seen)) > 30  # jittered: expiries do not repeat one interval
    rtt.clear_backoff()
    assert rtt.pto == pytest.approx(base) and not rtt.backoff_capped


def test_session_pto_jitter_is_deterministic_with_a_seeded_rng() -> None:
    def schedule(seed: int) -> list[float]:
        rtt = session_timer(random.Random(seed))
        rtt.on_sample(0.050)
        out = []
        for _ in range(10):
            rtt.on_timeout()
            out.append(rtt.pto)
        return out

    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)


def test_a_pto_above_the_cap_is_never_shortened_by_it() -> None:
    rtt = session_timer(random.Random(2))
    rtt.on_sample(2.0)  # a long path: base PTO 2 + 4 + 0.025 s, above the 1 s cap
    base = rtt.base_pto
    for _ in range(5):
        rtt.on_timeout()
        assert rtt.pto == pytest.approx(base)


def test_without_a_cap_the_pto_doubles_as_in_rfc_9002() -> None:
    rtt = RttEstimator()
    for k in range(1, 8):
        rtt.on_timeout()
        assert rtt.pto == min(2.0**k, 60.0)
    assert not rtt.backoff_capped


def test_handshake_timer_uses_a_measured_rtt_and_caps_its_backoff() -> None:
    timer = handshake_timer(random.Random(3))
    assert timer.pto == limits.HANDSHAKE_RETRANSMIT  # no sample yet
    timer.on_sample(0.080)
    assert timer.pto == pytest.approx(3 * 0.080 + 0.025)  # RFC 9002 after one sample
    for _ in range(20):
        timer.on_timeout()
        assert 3 * 0.080 + 0.025 <= timer.pto <= limits.HANDSHAKE_RETRANSMIT_MAX
