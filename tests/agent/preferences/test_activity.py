"""User-activity sources: logind's IdleHint parsing, the CPU fallback, and source choice."""

from __future__ import annotations

import os

from vcomp.agent.cpu_monitor import CpuTimes
from vcomp.agent.preferences.activity import (
    CpuActivity,
    input_source,
    logind_idle_seconds,
    parse_show_session,
)

SHOW = "Class=user\nType=x11\nIdleHint=yes\nIdleSinceHintMonotonic=1000000\n"


def test_logind_idle_time_of_the_least_idle_user_session() -> None:
    idle = parse_show_session(SHOW)
    busy = parse_show_session("Class=user\nType=wayland\nIdleHint=no\n")
    greeter = parse_show_session("Class=greeter\nType=x11\nIdleHint=no\n")
    assert logind_idle_seconds([idle], 61_000_000) == 60.0
    assert logind_idle_seconds([idle, busy], 61_000_000) == 0.0
    assert logind_idle_seconds([greeter], 61_000_000) is None
    assert logind_idle_seconds([], 1) is None


def test_cpu_fallback_counts_foreign_load_as_the_owner_being_active() -> None:
    act = CpuActivity(now=0.0)
    assert act.feed(CpuTimes(busy=0, total=0), 0.0, now=0.0).idle_seconds > 1e6
    # 10 s of machine time, 8 s busy of which 7 s were vcomp's own jobs: not the owner.
    r = act.feed(CpuTimes(busy=8, total=10), 7.0, now=5.0)
    assert r.source == "cpu" and r.idle_seconds > 1e6
    # Then 6 of 10 s busy and none of it ours: the owner is active now.
    assert act.feed(CpuTimes(busy=14, total=20), 7.0, now=10.0).idle_seconds == 0.0
    assert act.feed(CpuTimes(busy=14, total=30), 7.0, now=70.0).idle_seconds == 60.0


def test_without_display_or_logind_the_source_is_cpu_and_says_why(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no loginctl
    reading = input_source()
    assert reading.source == "cpu"
    assert "no $DISPLAY" in reading.detail and "loginctl" in reading.detail
    assert os.environ["PATH"] == "/nonexistent"
