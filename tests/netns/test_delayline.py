"""The delay line's queue on its own (no namespaces): order, delay, jitter, loss."""

from __future__ import annotations

import random

from tests.netns.delayline import DelayLine


def test_packets_leave_in_order_after_the_delay() -> None:
    line = DelayLine(0.020, 0.0, 0.0, random.Random(1))
    for i in range(5):
        line.admit(bytes([i]), now=1.0 + i * 0.001)
    assert line.release(1.0199) == []
    assert line.release(1.0215) == [b"\x00", b"\x01"]
    assert line.next_due() == 1.022
    assert line.release(2.0) == [b"\x02", b"\x03", b"\x04"]
    assert (line.passed, line.dropped, line.next_due()) == (5, 0, None)


def test_jitter_stays_within_its_bound_and_may_reorder() -> None:
    line = DelayLine(0.010, 0.010, 0.0, random.Random(3))
    for i in range(200):
        line.admit(i.to_bytes(2, "big"), now=0.0)
    assert line.release(0.00999) == []
    out = line.release(0.020)
    assert sorted(out) == [i.to_bytes(2, "big") for i in range(200)]
    assert out != sorted(out)  # equal send times, random release times


def test_loss_drops_about_the_configured_fraction() -> None:
    line = DelayLine(0.0, 0.0, 0.25, random.Random(7))
    for _ in range(4000):
        line.admit(b"x", now=0.0)
    released = line.release(0.0)
    assert line.dropped + len(released) == 4000
    assert 900 <= line.dropped <= 1100  # 1000 +- about 7 sigma


def test_the_largest_packet_admitted_is_reported() -> None:
    """How a test sees that offloads merged segments before the delay line."""
    line = DelayLine(0.0, 0.0, 0.5, random.Random(2))
    for size in (60, 1500, 40, 1200):
        line.admit(bytes(size), now=0.0)
    assert line.largest == 1500  # dropped packets count too: they reached the line
