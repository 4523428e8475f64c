"""doctor's preference rows: each rule active / off / unavailable with its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcomp.agent.preferences.doctor import preference_report
from vcomp.agent.preferences.settings import Preferences


def rows(prefs: Preferences) -> dict[str, tuple[str, str]]:
    return {name: (status, reason) for name, status, reason in preference_report(prefs)}


def test_user_activity_source_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    status, reason = rows(Preferences(run_if_user_active=False))["user_active"]
    assert status == "active"
    assert "foreign CPU load" in reason and "no $DISPLAY" in reason


def test_battery_rule_with_and_without_a_battery(tmp_path: Path) -> None:
    none = rows(Preferences(battery_below=20, power_supply=str(tmp_path)))["battery"]
    assert none[0] == "unavailable" and "no battery" in none[1]
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("64\n")
    status, reason = rows(Preferences(battery_below=20, power_supply=str(tmp_path)))["battery"]
    assert status == "active" and "now 64%" in reason and "goes on at 30%" in reason


def test_caps_and_schedule() -> None:
    r = rows(Preferences(max_memory=1 << 30, schedule="Sat-Sun all"))
    assert r["max_memory"][0] == "active" and r["max_upload_rate"][0] == "off"
    assert r["schedule"] == ("active", "jobs run only 'Sat-Sun all' (local time)")
