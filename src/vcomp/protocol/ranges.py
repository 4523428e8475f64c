"""A bounded set of u64 packet numbers, kept as sorted disjoint inclusive ranges.

The receiver records every packet number it sees here and reports the set in
ACKs, newest ranges first. Packet numbers almost always arrive as "the previous
one plus one", so :meth:`RangeSet.add` handles that case with one comparison and
one store; everything else (gaps, reordering, duplicates) takes a bisect.

The set is bounded: once it holds ``max_ranges`` ranges, adding a new range
drops the lowest (oldest) one. Forgetting that we received an old packet is
safe: ACKs only ever report the newest ``max_ranges`` ranges anyway, and if the
sender never saw an ACK for such a packet it declares it lost and sends its
content again under a new packet number; the receiver then drops the repeated
stream data as a duplicate (by sequence number) and acknowledges the new packet.
The worst case is one needless retransmission, never lost or repeated data, and
a peer that scatters packet numbers cannot make the set grow.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from itertools import islice
from operator import itemgetter

U64_MAX = (1 << 64) - 1
DEFAULT_MAX_RANGES = 64

_lo = itemgetter(0)


class RangeSet:
    """Sorted disjoint inclusive ranges of u64 ints, at most ``max_ranges`` of them."""

    __slots__ = ("_max_ranges", "_ranges")

    def __init__(self, max_ranges: int = DEFAULT_MAX_RANGES) -> None:
        if max_ranges < 1:
            raise ValueError("max_ranges must be at least 1")
        self._max_ranges = max_ranges
        # Ascending [lo, hi] pairs; mutable lists so the common append is one store.
        self._ranges: list[list[int]] = []

    @property
    def max_ranges(self) -> int:
        return self._max_ranges

    def add(self, n: int) -> bool:
        """Add ``n``; return True if it was not in the set before."""
        ranges = self._ranges
        if ranges:
            last = ranges[-1]
            hi = last[1]
            if hi < n <= U64_MAX:
                if n == hi + 1:  # the common case: the next packet number
                    last[1] = n
                else:
                    ranges.append([n, n])
                    if len(ranges) > self._max_ranges:
                        del ranges[0]
                return True
        if not 0 <= n <= U64_MAX:
            raise ValueError(f"{n} is not a u64")
        return self._add_slow(n)

    def _add_slow(self, n: int) -> bool:
        ranges = self._ranges
        i = bisect_right(ranges, n, key=_lo)  # ranges[i - 1] is the last with lo <= n
        prev = ranges[i - 1] if i > 0 else None
        if prev is not None and n <= prev[1]:
            return False
        nxt = ranges[i] if i < len(ranges) else None
        joins_prev = prev is not None and prev[1] + 1 == n
        joins_next = nxt is not None and nxt[0] - 1 == n
        if joins_prev and joins_next:
            assert prev is not None and nxt is not None
            prev[1] = nxt[1]
            del ranges[i]
        elif joins_prev:
            assert prev is not None
            prev[1] = n
        elif joins_next:
            assert nxt is not None
            nxt[0] = n
        else:
            ranges.insert(i, [n, n])
            if len(ranges) > self._max_ranges:
                del ranges[0]
                return i > 0  # the new range itself was the lowest and is gone again
        return True

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        i = bisect_right(self._ranges, n, key=_lo)
        return i > 0 and n <= self._ranges[i - 1][1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Ranges as ``(lo, hi)``, highest first (the order ACKs carry them)."""
        return ((r[0], r[1]) for r in reversed(self._ranges))

    def descending(self, limit: int | None = None) -> list[tuple[int, int]]:
        """The highest ``limit`` ranges (all if None), highest first."""
        ranges = self._ranges
        if len(ranges) == 1 and (limit is None or limit > 0):  # loss-free steady state
            first = ranges[0]
            return [(first[0], first[1])]
        if limit is None or limit >= len(ranges):
            return [(r[0], r[1]) for r in reversed(ranges)]
        return [(r[0], r[1]) for r in islice(reversed(ranges), limit)]

    def __len__(self) -> int:
        """Number of ranges (not of members)."""
        return len(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    @property
    def largest(self) -> int | None:
        return self._ranges[-1][1] if self._ranges else None

    @property
    def smallest(self) -> int | None:
        return self._ranges[0][0] if self._ranges else None

    def clear(self) -> None:
        self._ranges.clear()

    def __repr__(self) -> str:
        body = ", ".join(f"{lo}..{hi}" if lo != hi else str(lo) for lo, hi in self._ranges)
        return f"RangeSet([{body}])"
