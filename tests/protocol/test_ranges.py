from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.protocol.ranges import U64_MAX, RangeSet


def test_empty() -> None:
    rs = RangeSet()
    assert not rs
    assert len(rs) == 0
    assert list(rs) == []
    assert rs.largest is None and rs.smallest is None
    assert 0 not in rs


def test_appending_the_next_number_extends_one_range() -> None:
    rs = RangeSet()
    for n in range(1000):
        assert rs.add(n)
    assert list(rs) == [(0, 999)]
    assert len(rs) == 1


def test_gaps_make_ranges_iterated_highest_first() -> None:
    rs = RangeSet()
    for n in (0, 1, 2, 5, 6, 9):
        rs.add(n)
    assert list(rs) == [(9, 9), (5, 6), (0, 2)]
    assert rs.descending() == [(9, 9), (5, 6), (0, 2)]
    assert rs.descending(2) == [(9, 9), (5, 6)]
    assert rs.largest == 9 and rs.smallest == 0


def test_filling_a_gap_merges_both_neighbours() -> None:
    rs = RangeSet()
    for n in (1, 2, 4, 5):
        rs.add(n)
    assert rs.add(3)
    assert list(rs) == [(1, 5)]
    assert rs.add(0)
    assert list(rs) == [(0, 5)]


def test_extending_a_range_downwards_and_upwards_in_the_middle() -> None:
    rs = RangeSet()
    for n in (0, 10, 20):
        rs.add(n)
    rs.add(9)
    rs.add(11)
    assert list(rs) == [(20, 20), (9, 11), (0, 0)]


def test_duplicates_report_false_and_change_nothing() -> None:
    rs = RangeSet()
    for n in (3, 4, 8):
        rs.add(n)
    assert not rs.add(3)
    assert not rs.add(4)
    assert not rs.add(8)
    assert list(rs) == [(8, 8), (3, 4)]


def test_contains() -> None:
    rs = RangeSet()
    for n in (0, 1, 2, 7, 8):
        rs.add(n)
    assert all(n in rs for n in (0, 1, 2, 7, 8))
    assert all(n not in rs for n in (-1, 3, 6, 9, 1 << 70))
    assert "1" not in rs


def test_bound_drops_the_lowest_ranges() -> None:
    rs = RangeSet(max_ranges=3)
    for n in (0, 2, 4, 6, 8):
        rs.add(n)
    assert list(rs) == [(8, 8), (6, 6), (4, 4)]
    # A number below everything kept would be the lowest range: it is not kept.
    assert not rs.add(1)
    assert list(rs) == [(8, 8), (6, 6), (4, 4)]
    # Inserting in the middle drops the lowest instead.
    assert rs.add(5) is True  # merges, no new range
    assert list(rs) == [(8, 8), (4, 6)]
    rs.add(10)
    rs.add(12)
    assert list(rs) == [(12, 12), (10, 10), (8, 8)]


def test_u64_bounds() -> None:
    rs = RangeSet()
    rs.add(U64_MAX)
    assert U64_MAX in rs
    with pytest.raises(ValueError):
        rs.add(U64_MAX + 1)
    with pytest.raises(ValueError):
        rs.add(-1)
    with pytest.raises(ValueError):
        RangeSet(max_ranges=0)


def test_clear_and_repr() -> None:
    rs = RangeSet()
    rs.add(1)
    rs.add(3)
    rs.add(4)
    assert repr(rs) == "RangeSet([1, 3..4])"
    rs.clear()
    assert not rs


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=300))
def test_matches_a_plain_set(numbers: list[int]) -> None:
    rs = RangeSet(max_ranges=10_000)
    seen: set[int] = set()
    for n in numbers:
        assert rs.add(n) == (n not in seen)
        seen.add(n)
    expanded = {n for lo, hi in rs for n in range(lo, hi + 1)}
    assert expanded == seen
    pairs = list(rs)
    # Descending, disjoint and never adjacent (adjacent ranges must have merged).
    for (lo1, _hi1), (_lo2, hi2) in pairwise(pairs):
        assert hi2 + 1 < lo1
    assert all(lo <= hi for lo, hi in pairs)
    assert all((n in rs) == (n in seen) for n in range(-1, 302))


@given(
    st.integers(min_value=1, max_value=8),
    st.lists(st.integers(min_value=0, max_value=200), max_size=200),
)
def test_bounded_set_keeps_the_highest_ranges(max_ranges: int, numbers: list[int]) -> None:
    rs = RangeSet(max_ranges=max_ranges)
    for n in numbers:
        rs.add(n)
        assert len(rs) <= max_ranges
    if numbers:
        assert rs.largest == max(numbers)
    # Whatever is kept was really added.
    assert all(n in set(numbers) for lo, hi in rs for n in range(lo, hi + 1))
