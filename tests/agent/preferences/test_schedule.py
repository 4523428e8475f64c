"""Schedules at explicit datetimes: weekdays, midnight crossings, the week's wrap, errors."""

from __future__ import annotations

from datetime import datetime

import pytest

from vcomp.agent.preferences.schedule import parse_schedule
from vcomp.errors import ConfigError

# 2026-11-30 is a Monday.
MON, TUE, FRI, SAT, SUN = 30, 1, 4, 5, 6


def at(day: int, hour: int, minute: int = 0) -> datetime:
    month = 11 if day == 30 else 12
    return datetime(2026, month, day, hour, minute)


def test_the_issue_example() -> None:
    s = parse_schedule("Mon-Fri 18:00-08:00, Sat-Sun all")
    assert at(MON, 12).weekday() == 0
    assert not s.allows(at(MON, 12))
    assert s.allows(at(MON, 18))
    assert s.allows(at(MON, 23, 59))
    assert s.allows(at(TUE, 7, 59))  # Monday's window crosses midnight
    assert not s.allows(at(TUE, 8))
    assert s.allows(at(FRI, 19))
    assert s.allows(at(SAT, 3))  # Friday night into Saturday, and Saturday itself
    assert s.allows(at(SUN, 23, 59))


def test_a_sunday_night_window_wraps_into_monday() -> None:
    s = parse_schedule("Sun 22:00-06:00")
    assert s.allows(at(SUN, 23))
    assert s.allows(at(MON, 5, 59))
    assert not s.allows(at(MON, 6))
    assert not s.allows(at(SAT, 23))


def test_day_lists_wrapping_ranges_and_full_names() -> None:
    s = parse_schedule("Sat-Mon 09:00-10:00, wednesday+Fri 00:00-24:00")
    assert s.allows(at(SUN, 9, 30)) and s.allows(at(MON, 9, 30)) and s.allows(at(SAT, 9))
    assert not s.allows(at(TUE, 9, 30))
    assert s.allows(datetime(2026, 12, 2, 13)) and s.allows(at(FRI, 23, 59))


def test_empty_and_always_allow_everything() -> None:
    for text in ("", "  ", "always", "Always"):
        s = parse_schedule(text)
        assert s.always and s.allows(at(TUE, 3))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Mon", "must be 'DAYS TIMES'"),
        ("Mon 18:00", "HH:MM-HH:MM or 'all'"),
        ("Mo 18:00-19:00", "'mo' is not a day"),
        ("Funday 18:00-19:00", "is not a day"),
        ("Mon 25:00-26:00", "is not a time of day"),
        ("Mon 9-10", "is not a time HH:MM"),
        ("Mon 10:00-10:00", "is empty"),
        ("Mon all,", "empty window"),
        ("Mon all,, Tue all", "empty window"),
        ("x" * 600, "longer than"),
    ],
)
def test_bad_schedules_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_schedule(text)
