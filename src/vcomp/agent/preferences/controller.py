"""Turns the volunteer's rules into reasons on the agent's :class:`Hold`.

:meth:`PreferenceController.evaluate` is a pure step over explicit readings (a wall
time, a battery reading, an idle reading), so tests drive it with chosen datetimes and
a fake sysfs directory. :meth:`run` reads the machine every ``POLL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime

from vcomp import logfmt
from vcomp.agent.cpu_monitor import read_machine_times
from vcomp.agent.preferences.activity import (
    CpuActivity,
    IdleReading,
    input_source,
    read_logind,
    read_x11,
)
from vcomp.agent.preferences.battery import BatteryHysteresis, BatteryReading, read_battery
from vcomp.agent.preferences.settings import Preferences
from vcomp.agent.sandbox.hold import Hold

log = logging.getLogger("vcomp.agent")

POLL_SECONDS = 1.0
PAUSE, SCHEDULE, BATTERY, USER_ACTIVE = "pause", "schedule", "battery", "user_active"


class PreferenceController:
    """One per agent: the volunteer's pause and rules, as reasons on ``hold``."""

    def __init__(
        self,
        prefs: Preferences,
        hold: Hold,
        *,
        own_cpu_seconds: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.prefs = prefs
        self.hold = hold
        self.schedule = prefs.parsed_schedule()
        self.battery = BatteryHysteresis(prefs.battery_below, prefs.battery_hysteresis)
        self._own_cpu = own_cpu_seconds
        self._clock = clock
        self.wall = wall  # local time for the schedule (tests give their own)
        self._cpu_activity = CpuActivity(clock())
        self.input: IdleReading | None = None  # the input source found at start
        self.last_battery: BatteryReading | None = None
        self.last_idle: IdleReading | None = None

    # ---- the volunteer's commands

    def pause(self) -> None:
        self.hold.set(PAUSE, "paused by the volunteer (vcomp-agent pause)")

    def resume(self) -> None:
        self.hold.clear(PAUSE)

    # ---- the rules

    def evaluate(
        self, *, when: datetime, battery: BatteryReading | None, idle: IdleReading | None
    ) -> None:
        """Set or clear the schedule, battery and user-activity reasons for these readings."""
        self._rule(
            SCHEDULE, not self.schedule.allows(when), f"outside the schedule {self.schedule.text!r}"
        )
        if battery is not None:
            self.last_battery = battery
            stopped = self.battery.feed(battery.percent)
            charge = f"{battery.percent:.0f}%" if battery.percent is not None else "?"
            self._rule(
                BATTERY,
                stopped,
                f"battery at {charge}: below {self.battery.below}%, "
                f"jobs go on at {self.battery.resume_at}%",
            )
        if idle is not None:
            self.last_idle = idle
            active = (
                not self.prefs.run_if_user_active
                and idle.idle_seconds is not None
                and idle.idle_seconds < self.prefs.user_idle_seconds
            )
            self._rule(USER_ACTIVE, active, f"the owner is using the machine ({idle.source})")

    def _rule(self, source: str, applies: bool, reason: str) -> None:
        if applies:
            self.hold.set(source, reason)
        else:
            self.hold.clear(source)

    # ---- reading the machine

    def activity_source(self) -> IdleReading:
        """Where user activity is read from (found once; ``doctor`` shows it)."""
        if self.input is None:
            self.input = input_source()
        return self.input

    def read_idle(self) -> IdleReading | None:
        if self.prefs.run_if_user_active:
            return None
        source = self.activity_source()
        if source.source == "x11":
            return read_x11()
        if source.source == "logind":
            return read_logind()
        return self._cpu_activity.feed(read_machine_times(), self._own_cpu(), self._clock())

    def read_battery(self) -> BatteryReading | None:
        return read_battery(self.prefs.power_supply) if self.prefs.battery_below else None

    def read(self) -> tuple[BatteryReading | None, IdleReading | None]:
        """Read the machine once (blocking: loginctl, sysfs; run it off the loop)."""
        return self.read_battery(), self.read_idle()

    async def run(self, stopping: asyncio.Event) -> None:
        if not self.prefs.run_if_user_active:
            source = await asyncio.to_thread(self.activity_source)
            logfmt.event(log, "user_activity_source", source=source.source, detail=source.detail)
        while not stopping.is_set():
            battery, idle = await asyncio.to_thread(self.read)
            # On the loop: the hold stops and continues job trees the regulators also drive.
            self.evaluate(when=self.wall(), battery=battery, idle=idle)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
