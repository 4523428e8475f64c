"""Anti-replay window: exact agreement with a set-based reference model."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcomp.errors import ConfigError, ReplayDetected
from vcomp.protocol.replay import ReplayWindow

U64_MAX = 2**64 - 1


class ReferenceWindow:
    """The specification in its plainest form: every number ever accepted, in a set."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def accepts(self, pn: int) -> bool:
        return pn not in self.seen and pn > self.highest - self.size

    def mark(self, pn: int) -> None:
        self.seen.add(pn)
        self.highest = max(self.highest, pn)


def accepted(window: ReplayWindow, pn: int) -> bool:
    """check(); on success update(), as a receiver does after authentication."""
    try:
        window.check(pn)
    except ReplayDetected:
        return False
    window.update(pn)
    return True


@st.composite
def packet_numbers(draw: st.DrawFn) -> list[int]:
    """Mostly nearby numbers (duplicates, reordering), with occasional big jumps."""
    start = draw(st.one_of(st.just(0), st.integers(0, U64_MAX - 2**20)))
    steps = draw(
        st.lists(
            st.one_of(
                st.integers(-3000, 3000),  # reorder within and beyond the window
                st.integers(-70, 70),  # duplicates and block edges
                st.integers(2000, 200_000),  # jumps that wrap the ring
                st.sampled_from([64, 128, 2048, 2049, 2112, -2048, -2047]),
            ),
            max_size=300,
        )
    )
    out = []
    pn = start
    for step in steps:
        pn = min(max(pn + step, 0), U64_MAX)
        out.append(pn)
    return out


@settings(max_examples=300, deadline=None)
@given(pns=packet_numbers(), size=st.sampled_from([1024, 2048, 1088]))
def test_agrees_with_reference_model(pns: list[int], size: int) -> None:
    window = ReplayWindow(size)
    model = ReferenceWindow(size)
    for pn in pns:
        expected = model.accepts(pn)
        assert accepted(window, pn) == expected, pn
        if expected:
            model.mark(pn)
        assert window.highest == model.highest


@settings(max_examples=200, deadline=None)
@given(pns=packet_numbers())
def test_each_packet_number_is_accepted_at_most_once(pns: list[int]) -> None:
    window = ReplayWindow()
    taken: set[int] = set()
    for pn in pns + pns[::-1]:
        if accepted(window, pn):
            assert pn not in taken
            taken.add(pn)


@given(pn=st.integers(0, U64_MAX), probes=st.lists(st.integers(0, U64_MAX), max_size=20))
def test_check_does_not_mutate(pn: int, probes: list[int]) -> None:
    window = ReplayWindow()
    window.update(pn)
    before = (window.highest, list(window._blocks))
    for probe in probes:
        with contextlib.suppress(ReplayDetected):
            window.check(probe)
    assert (window.highest, list(window._blocks)) == before


def test_in_window_reordering_is_accepted() -> None:
    window = ReplayWindow()
    window.update(5000)
    order = list(range(5000 - 2047, 5000))
    random.Random(1).shuffle(order)
    for pn in order:
        assert accepted(window, pn)
    for pn in order:
        assert not accepted(window, pn)
    assert window.highest == 5000


def test_window_edge() -> None:
    window = ReplayWindow(2048)
    window.update(10_000)
    window.check(10_000 - 2047)  # the oldest number still inside
    with pytest.raises(ReplayDetected):
        window.check(10_000 - 2048)
    with pytest.raises(ReplayDetected):
        window.update(10_000 - 2048)  # update refuses what check refuses
    with pytest.raises(ReplayDetected):
        window.check(0)


def test_duplicate_is_rejected() -> None:
    window = ReplayWindow()
    window.update(7)
    with pytest.raises(ReplayDetected):
        window.check(7)
    window.check(6)
    window.check(8)


def test_first_packet_may_be_anything() -> None:
    for first in (0, 1, 63, 64, 2**40, U64_MAX):
        window = ReplayWindow()
        assert window.highest == -1
        assert accepted(window, first)
        assert window.highest == first
        assert not accepted(window, first)


def test_jump_clears_stale_blocks() -> None:
    # Fill everything, then jump by amounts that land on every ring slot: a slot that
    # was not cleared would make an unseen number look replayed.
    for jump in [1, 63, 64, 65, 2047, 2048, 2049, 2111, 2112, 2113, 4096, 10**6]:
        window = ReplayWindow(2048)
        for pn in range(4096):
            window.update(pn)
        top = 4095 + jump
        window.update(top)
        for pn in range(top - 2047, top):
            if pn > 4095:
                window.check(pn)  # unseen: must pass
            else:
                with pytest.raises(ReplayDetected):
                    window.check(pn)


def test_huge_jump_to_the_largest_packet_number() -> None:
    window = ReplayWindow()
    for pn in range(100):
        window.update(pn)
    window.update(U64_MAX)
    with pytest.raises(ReplayDetected):
        window.check(U64_MAX)
    with pytest.raises(ReplayDetected):
        window.check(50)
    window.check(U64_MAX - 1)
    window.check(U64_MAX - 2047)


def test_out_of_range_numbers_are_rejected() -> None:
    window = ReplayWindow()
    for bad in (-1, 2**64):
        with pytest.raises(ReplayDetected):
            window.check(bad)
        with pytest.raises(ReplayDetected):
            window.update(bad)
    assert window.highest == -1


def test_size_validation() -> None:
    assert ReplayWindow().size == 2048
    for bad in (0, 64, 1023, 1000, 2047, 2050):
        with pytest.raises(ConfigError):
            ReplayWindow(bad)
    assert ReplayWindow(1024).size == 1024
    assert ReplayWindow(4096).size == 4096
