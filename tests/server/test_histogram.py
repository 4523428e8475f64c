"""The committer's latency histogram: buckets, totals, and a reader racing the writer."""

from __future__ import annotations

import threading

import pytest

from vcomp.server.histogram import COMMIT_BUCKETS, LatencyHistogram


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
