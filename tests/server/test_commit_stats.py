"""The committer's latency histogram: buckets, totals, and a reader racing the writer."""

from __future__ import annotations

import threading

import pytest

from vcomp.server.commit_stats import COMMIT_BUCKETS, LatencyHistogram, Throughput


def test_observations_land_in_cumulative_buckets() -> None:
    h = LatencyHistogram((0.01, 0.1, 1.0))
    h.observe_many([0.005, 0.01, 0.05, 0.5, 3.0, -1.0])  # a clock step back counts as 0
    snap = h.snapshot()
    assert snap.bounds == (0.01, 0.1, 1.0)
    assert snap.cumulative == (3, 4, 5, 6)  # le=0.01 includes 0.01 itself; +Inf is all
    assert snap.count == 6
    assert snap.total == pytest.approx(0.005 + 0.01 + 0.05 + 0.5 + 3.0)


@pytest.mark.parametrize("bounds", [(), (1.0, 0.5), (0.1, 0.1)])
def test_bad_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="ascending"):
        LatencyHistogram(bounds)


def test_a_reader_never_sees_a_half_written_group() -> None:
    """Groups of 7 observations from a writer thread: every snapshot is consistent
    (a count that is a multiple of 7, buckets that never go down)."""
    h = LatencyHistogram(COMMIT_BUCKETS)
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            h.observe_many([0.002] * 7)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(2000):
            snap = h.snapshot()
            assert snap.count % 7 == 0
            assert list(snap.cumulative) == sorted(snap.cumulative)
    finally:
        stop.set()
        writer.join()
    assert h.snapshot().count > 0


def test_throughput_keeps_the_last_slots_and_forgets_older_ones() -> None:
    ring = Throughput(slot_seconds=10, slots=3)
    ring.add(2, 100.0)
    ring.add(3, 105.0)  # same slot as 100
    ring.add(4, 115.0)
    assert ring.series(119.0) == [0, 5, 4]
    assert ring.series(125.0) == [5, 4, 0]
    ring.add(1, 131.0)  # reuses the cell of slot 10 (t=100): that count is gone
    assert ring.series(131.0) == [4, 0, 1]
    assert ring.series(1000.0) == [0, 0, 0]


def test_a_bad_throughput_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Throughput(slot_seconds=0)
