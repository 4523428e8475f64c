"""What ``vcomp-agent doctor`` says about the volunteer's rules on this machine: each
rule active, off or unavailable, with the source it reads (user activity, battery)."""

from __future__ import annotations

from vcomp.agent.preferences.activity import input_source
from vcomp.agent.preferences.battery import read_battery
from vcomp.agent.preferences.settings import Preferences


def preference_report(prefs: Preferences) -> list[tuple[str, str, str]]:
    """(rule, status, reason) rows; status is active, off or unavailable."""
    rows: list[tuple[str, str, str]] = []
    source = input_source()
    where = (
        f"keyboard/mouse idle time from {source.source}"
        if source.idle_seconds is not None
        else f"foreign CPU load (no input idle time: {source.detail})"
    )
    if prefs.run_if_user_active:
        rows.append(("user_active", "off", f"run_if_user_active = true; would read {where}"))
    else:
        rows.append(("user_active", "active", f"stops jobs while the owner is active: {where}"))
    battery = read_battery(prefs.power_supply)
    if battery.percent is None:
        why = battery.error or f"no battery under {prefs.power_supply}"
        status = "off" if not prefs.battery_below else "unavailable"
        rows.append(("battery", status, why))
    elif not prefs.battery_below:
        rows.append(("battery", "off", f"battery_below = 0 (charge now {battery.percent:.0f}%)"))
    else:
        rows.append(
            (
                "battery",
                "active",
                f"stops below {prefs.battery_below}%, goes on at "
                f"{prefs.battery_below + prefs.battery_hysteresis}% (now {battery.percent:.0f}%)",
            )
        )
    schedule = prefs.parsed_schedule()
    rows.append(
        ("schedule", "off", "always")
        if schedule.always
        else ("schedule", "active", f"jobs run only {schedule.text!r} (local time)")
    )
    rows.append(_cap("max_memory", prefs.max_memory, "bytes, all jobs together"))
    rows.append(_cap("max_upload_rate", prefs.max_upload_rate, "bytes/s"))
    rows.append(_cap("max_download_rate", prefs.max_download_rate, "bytes/s"))
    return rows


def _cap(name: str, value: int, unit: str) -> tuple[str, str, str]:
    return (name, "active", f"{value} {unit}") if value else (name, "off", "no cap")
