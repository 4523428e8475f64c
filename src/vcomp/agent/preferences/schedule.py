"""``schedule``: the times of the week when this agent may run jobs.

Syntax: windows separated by commas, each ``DAYS TIMES``::

    "Mon-Fri 18:00-08:00, Sat-Sun all"

``DAYS`` is a day (``Mon``), a range (``Mon-Fri``, which may wrap: ``Sat-Mon``), or a
``+``-joined list of those (``Mon+Wed+Fri``); ``TIMES`` is ``HH:MM-HH:MM`` or ``all``.
A window whose end is not after its start crosses midnight: ``Mon 18:00-08:00`` runs
from Monday 18:00 to Tuesday 08:00 (the window belongs to the day it starts on). The
empty schedule (or ``"always"``) allows every minute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from vcomp.errors import ConfigError

FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MINUTES_PER_DAY = 24 * 60
MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY
MAX_SCHEDULE = 512  # characters; a week needs far fewer
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class Window:
    """One weekly interval ``[start, end)`` in minutes from Monday 00:00 (end may pass a week)."""

    start: int
    end: int

    def contains(self, minute_of_week: int) -> bool:
        m = minute_of_week
        return self.start <= m < self.end or self.start <= m + MINUTES_PER_WEEK < self.end


@dataclass(frozen=True, slots=True)
class Schedule:
    """A parsed schedule; ``windows == ()`` with ``always`` means no restriction."""

    text: str
    windows: tuple[Window, ...]
    always: bool

    def allows(self, when: datetime) -> bool:
        """Whether jobs may run at ``when`` (a local wall-clock time)."""
        if self.always:
            return True
        minute = when.weekday() * MINUTES_PER_DAY + when.hour * 60 + when.minute
        return any(w.contains(minute) for w in self.windows)


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule; a ConfigError names the part that is wrong."""
    if len(text) > MAX_SCHEDULE:
        raise ConfigError(f"schedule is longer than {MAX_SCHEDULE} characters")
    stripped = text.strip()
    if stripped.lower() in ("", "always"):
        return Schedule(text=stripped, windows=(), always=True)
    windows: list[Window] = []
    for part in stripped.split(","):
        windows.extend(_window(part.strip()))
    return Schedule(text=stripped, windows=tuple(windows), always=False)


def _window(part: str) -> list[Window]:
    if not part:
        raise ConfigError("schedule has an empty window (two commas, or a trailing comma)")
    fields = part.split()
    if len(fields) != 2:
        raise ConfigError(
            f"schedule window {part!r} must be 'DAYS TIMES', e.g. 'Mon-Fri 18:00-08:00'"
        )
    days, times = fields
    start, end = _times(times, part)
    if start == end:
        raise ConfigError(f"schedule window {part!r} is empty (use 'all' for a whole day)")
    length = end - start if end > start else end + MINUTES_PER_DAY - start
    return [
        Window(day * MINUTES_PER_DAY + start, day * MINUTES_PER_DAY + start + length)
        for day in _days(days, part)
    ]


def _days(text: str, part: str) -> list[int]:
    out: list[int] = []
    for item in text.lower().split("+"):
        first, sep, last = item.partition("-")
        a = _day(first, part)
        b = _day(last, part) if sep else a
        span = (b - a) % 7
        out.extend((a + i) % 7 for i in range(span + 1))
    return sorted(set(out))


def _day(name: str, part: str) -> int:
    full = [d for d in FULL_DAYS if len(name) >= 3 and d.startswith(name)]
    if not full:
        raise ConfigError(
            f"schedule window {part!r}: {name!r} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"
        )
    return FULL_DAYS.index(full[0])


def _times(text: str, part: str) -> tuple[int, int]:
    if text.lower() == "all":
        return 0, MINUTES_PER_DAY
    first, sep, last = text.partition("-")
    if not sep:
        raise ConfigError(f"schedule window {part!r}: times must be HH:MM-HH:MM or 'all'")
    return _minute(first, part), _minute(last, part)


def _minute(text: str, part: str) -> int:
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise ConfigError(f"schedule window {part!r}: {text!r} is not a time HH:MM")
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour == 24 and minute == 0:
        return MINUTES_PER_DAY
    if hour > 23 or minute > 59:
        raise ConfigError(f"schedule window {part!r}: {text!r} is not a time of day")
    return hour * 60 + minute
