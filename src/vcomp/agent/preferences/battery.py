"""Battery threshold: stop jobs when the charge falls below ``battery_below`` percent,
go on once it is back above ``battery_below + battery_hysteresis``.

The charge is read from ``/sys/class/power_supply/*/capacity`` of the supplies whose
``type`` is ``Battery`` (several batteries: their mean). The root is configurable so
tests use a fake sysfs directory. A machine without a battery never stops for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

POWER_SUPPLY_ROOT = "/sys/class/power_supply"
MAX_SUPPLIES = 64  # a laptop has one or two; a hostile directory is not walked further
MAX_ATTR = 64  # bytes read from one attribute file


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """The mean charge of every battery found, in percent (None: no battery)."""

    percent: float | None
    batteries: int
    error: str = ""


def _attr(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_ATTR).decode("ascii", "replace").strip()
    except OSError:
        return None


def read_battery(root: str | Path = POWER_SUPPLY_ROOT) -> BatteryReading:
    """Read every battery under ``root``; unreadable or odd entries are skipped."""
    try:
        names = sorted(os.listdir(root))[:MAX_SUPPLIES]
    except OSError as exc:
        return BatteryReading(None, 0, f"cannot list {root}: {exc.strerror or exc}")
    charges: list[float] = []
    for name in names:
        supply = Path(root) / name
        if _attr(supply / "type") != "Battery" or _attr(supply / "present") == "0":
            continue
        text = _attr(supply / "capacity")
        try:
            value = float(text) if text is not None else -1.0
        except ValueError:
            continue
        if 0.0 <= value <= 100.0:
            charges.append(value)
    if not charges:
        return BatteryReading(None, 0)
    return BatteryReading(sum(charges) / len(charges), len(charges))


class BatteryHysteresis:
    """Stop below ``below``; go on only at or above ``below + hysteresis``."""

    def __init__(self, below: float, hysteresis: float) -> None:
        self.below = below
        self.resume_at = below + hysteresis
        self.stopped = False

    def feed(self, percent: float | None) -> bool:
        """Take one reading; return whether jobs must stand still now."""
        if percent is None or self.below <= 0:
            self.stopped = False
        elif self.stopped:
            self.stopped = percent < self.resume_at
        else:
            self.stopped = percent < self.below
        return self.stopped
