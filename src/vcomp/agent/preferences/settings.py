"""``[preferences]`` in agent.toml: what the volunteer asks of the agent, each also a
``join`` option. Not measured into PCR 18: they decide when and how much, never how
jobs are isolated."""

from __future__ import annotations

from dataclasses import dataclass

from vcomp.agent.preferences.battery import POWER_SUPPLY_ROOT
from vcomp.agent.preferences.schedule import Schedule, parse_schedule
from vcomp.errors import ConfigError
from vcomp.tomlconfig import Table, check_int
from vcomp.units import MAX_SIZE

MAX_RATE = 1 << 40  # bytes per second; anything above is "no cap" in practice
MAX_MEMORY = MAX_SIZE  # what --max-memory (vcomp.units.SIZE) can say


@dataclass(frozen=True, slots=True)
class Preferences:
    """The volunteer's rules. Zero means "no rule" for every number."""

    max_memory: int = 0  # bytes, the sum over concurrent jobs
    run_if_user_active: bool = True
    user_idle_seconds: int = 180  # input idle this long before jobs run again
    battery_below: int = 0  # percent; stop jobs below it
    battery_hysteresis: int = 10  # percent above battery_below before they go on
    power_supply: str = POWER_SUPPLY_ROOT
    schedule: str = ""  # "Mon-Fri 18:00-08:00, Sat-Sun all"; "" = always
    max_upload_rate: int = 0  # bytes/s, all of this agent's sessions together
    max_download_rate: int = 0

    def __post_init__(self) -> None:
        check_int("max_memory", self.max_memory, 0, MAX_MEMORY)
        if not isinstance(self.run_if_user_active, bool):
            raise ConfigError("run_if_user_active must be true or false")
        check_int("user_idle_seconds", self.user_idle_seconds, 1, 7 * 24 * 3600)
        check_int("battery_below", self.battery_below, 0, 100)
        check_int("battery_hysteresis", self.battery_hysteresis, 0, 100)
        if self.battery_below and self.battery_below + self.battery_hysteresis > 100:
            raise ConfigError("battery_below + battery_hysteresis must be at most 100")
        if not self.power_supply:
            raise ConfigError("power_supply must be a directory path")
        self.parsed_schedule()
        check_int("max_upload_rate", self.max_upload_rate, 0, MAX_RATE)
        check_int("max_download_rate", self.max_download_rate, 0, MAX_RATE)

    def parsed_schedule(self) -> Schedule:
        return parse_schedule(self.schedule)

    @classmethod
    def from_table(cls, t: Table) -> Preferences:
        d = cls()
        return cls(
            max_memory=t.integer("max_memory", d.max_memory),
            run_if_user_active=t.flag("run_if_user_active", d.run_if_user_active),
            user_idle_seconds=t.integer("user_idle_seconds", d.user_idle_seconds),
            battery_below=t.integer("battery_below", d.battery_below),
            battery_hysteresis=t.integer("battery_hysteresis", d.battery_hysteresis),
            power_supply=t.text("power_supply", d.power_supply),
            schedule=t.text("schedule", d.schedule),
            max_upload_rate=t.integer("max_upload_rate", d.max_upload_rate),
            max_download_rate=t.integer("max_download_rate", d.max_download_rate),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "max_memory": self.max_memory,
            "run_if_user_active": self.run_if_user_active,
            "user_idle_seconds": self.user_idle_seconds,
            "battery_below": self.battery_below,
            "battery_hysteresis": self.battery_hysteresis,
            "schedule": self.schedule or "always",
            "max_upload_rate": self.max_upload_rate,
            "max_download_rate": self.max_download_rate,
        }


def render_preferences(p: Preferences) -> list[str]:
    """The ``[preferences]`` lines of agent.toml for ``p`` (``json.dumps`` quotes a TOML string)."""
    import json

    def line(assignment: str, comment: str) -> str:
        return f"{assignment:<26} # {comment}"

    return [
        line("[preferences]", "when and how much this machine gives (0 = no rule)"),
        line(f"max_memory = {p.max_memory}", "bytes all running jobs may hold together"),
        line(
            f"run_if_user_active = {'true' if p.run_if_user_active else 'false'}",
            "false: only while keyboard and mouse are idle",
        ),
        line(f"user_idle_seconds = {p.user_idle_seconds}", "... for this long"),
        line(f"battery_below = {p.battery_below}", "percent: stop jobs below it (not lost)"),
        line(f"battery_hysteresis = {p.battery_hysteresis}", "go on above below + this"),
        line(
            f"schedule = {json.dumps(p.schedule, ensure_ascii=False)}",
            'e.g. "Mon-Fri 18:00-08:00, Sat-Sun all"; "" = always',
        ),
        line(f"max_upload_rate = {p.max_upload_rate}", "bytes/s, all sessions together"),
        line(f"max_download_rate = {p.max_download_rate}", "bytes/s, all sessions together"),
    ]
