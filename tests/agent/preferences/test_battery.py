"""Battery readings from a fake sysfs directory, and the threshold with hysteresis."""

from __future__ import annotations

import os
from pathlib import Path

from vcomp.agent.preferences.battery import BatteryHysteresis, read_battery


def supply(root: Path, name: str, **attrs: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    for key, value in attrs.items():
        (d / key).write_text(value + "\n")


def test_reads_the_mean_of_present_batteries(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", present="1", capacity="40")
    supply(tmp_path, "BAT1", type="Battery", capacity="60")
    supply(tmp_path, "BAT2", type="Battery", present="0", capacity="1")
    r = read_battery(tmp_path)
    assert r.percent == 50.0 and r.batteries == 2


def test_no_battery_and_no_directory(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    assert read_battery(tmp_path).percent is None
    missing = read_battery(tmp_path / "nope")
    assert missing.percent is None and "cannot list" in missing.error


def test_hostile_entries_are_skipped(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="NaN")
    supply(tmp_path, "BAT1", type="Battery", capacity="250")
    supply(tmp_path, "BAT2", type="Battery", capacity="-5")
    (tmp_path / "BAT3").mkdir()
    (tmp_path / "BAT3" / "type").write_text("Battery")
    # A huge attribute is read only up to its bound (no allocation of the whole file).
    with open(tmp_path / "BAT3" / "capacity", "wb") as f:
        f.write(b"7" * (8 << 20))
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # a symlink loop
    supply(tmp_path, "BAT4", type="Battery", capacity="30")
    assert read_battery(tmp_path).percent == 30.0


def test_hysteresis_stops_below_and_goes_on_above_threshold_plus_margin() -> None:
    h = BatteryHysteresis(below=20, hysteresis=10)
    seen = [h.feed(p) for p in (50, 21, 19.5, 25, 29, 30, 25, 19)]
    assert seen == [False, False, True, True, True, False, False, True]


def test_unknown_charge_or_rule_off_never_stops() -> None:
    assert BatteryHysteresis(below=20, hysteresis=10).feed(None) is False
    assert BatteryHysteresis(below=0, hysteresis=10).feed(1) is False
