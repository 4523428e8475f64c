"""The arithmetic of bench/flows.py on hand-made samples (no namespaces)."""

from __future__ import annotations

import pytest
from bench import flows


def test_jain_index_and_windows_from_samples() -> None:
    samples = flows.Samples(
        names=["x", "y"],
        times=[0.0, 0.5, 1.0, 1.5, 2.0],
        delivered=[[10, 0], [20, 5], [30, 15], [40, 25], [50, 35]],
        started=[0.0, 0.0],
        finished=[None, None],
        failed=[None, None],
    )
    assert flows.window_bytes(samples, 1.5) == [30, 30]
    assert flows.window_seconds(samples, 1.5) == 1.5
    assert flows.jain_index([30, 30]) == 1.0
    assert flows.jain_index([1, 0]) == 0.5
    assert flows.interval_jain(samples, 1.0) == [1.0, 1.0]
    with pytest.raises(flows.OverlapTooShort, match="delivered nothing"):
        flows.window_bytes(samples, 2.0)  # y had nothing when that window opened
    samples.finished[0] = 1.8
    with pytest.raises(flows.OverlapTooShort, match="finished before"):
        flows.window_bytes(samples, 1.0)
