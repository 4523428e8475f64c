"""The rules set and clear the hold's reasons, driven with explicit datetimes and a fake sysfs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from vcomp.agent.preferences.activity import IdleReading
from vcomp.agent.preferences.battery import read_battery
from vcomp.agent.preferences.controller import PreferenceController
from vcomp.agent.preferences.settings import Preferences
from vcomp.agent.sandbox.hold import Hold

MONDAY_NOON = datetime(2026, 11, 30, 12, 0)
MONDAY_EVENING = datetime(2026, 11, 30, 19, 0)


def battery_at(root: Path, percent: int) -> None:
    bat = root / "BAT0"
    bat.mkdir(exist_ok=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text(f"{percent}\n")


def test_schedule_holds_outside_its_windows() -> None:
    hold = Hold()
    ctl = PreferenceController(Preferences(schedule="Mon-Fri 18:00-08:00"), hold)
    ctl.evaluate(when=MONDAY_NOON, battery=None, idle=None)
    assert "schedule" in hold.reasons and "Mon-Fri 18:00-08:00" in hold.reasons["schedule"]
    ctl.evaluate(when=MONDAY_EVENING, battery=None, idle=None)
    assert not hold.held


def test_battery_from_a_fake_sysfs_with_hysteresis(tmp_path: Path) -> None:
    hold = Hold()
    prefs = Preferences(battery_below=20, battery_hysteresis=10, power_supply=str(tmp_path))
    ctl = PreferenceController(prefs, hold)
    held = []
    for percent in (50, 19, 25, 30, 31):
        battery_at(tmp_path, percent)
        ctl.evaluate(when=MONDAY_NOON, battery=ctl.read_battery(), idle=None)
        held.append(hold.held)
    assert held == [False, True, True, False, False]
    battery_at(tmp_path, 10)
    ctl.evaluate(when=MONDAY_NOON, battery=read_battery(tmp_path), idle=None)
    assert "10%" in hold.reasons["battery"]


def test_user_activity_holds_only_when_the_volunteer_asked() -> None:
    hold = Hold()
    busy = IdleReading("x11", 5.0)
    idle = IdleReading("x11", 600.0)
    PreferenceController(Preferences(), hold).evaluate(when=MONDAY_NOON, battery=None, idle=busy)
    assert not hold.held
    ctl = PreferenceController(Preferences(run_if_user_active=False, user_idle_seconds=60), hold)
    ctl.evaluate(when=MONDAY_NOON, battery=None, idle=busy)
    assert "x11" in hold.reasons["user_active"]
    ctl.evaluate(when=MONDAY_NOON, battery=None, idle=idle)
    assert not hold.held


def test_pause_is_independent_of_the_other_rules() -> None:
    hold = Hold()
    ctl = PreferenceController(Preferences(schedule="Mon 18:00-19:00"), hold)
    ctl.pause()
    ctl.evaluate(when=MONDAY_EVENING.replace(hour=18), battery=None, idle=None)
    assert set(hold.reasons) == {"pause"}
    ctl.evaluate(when=MONDAY_NOON, battery=None, idle=None)
    ctl.resume()
    assert set(hold.reasons) == {"schedule"}
