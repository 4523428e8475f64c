"""[preferences] in agent.toml: round trip, defaults, errors naming the key, join overrides,
and that none of it changes the measured sandbox policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vcomp.agent.config import init_agent_home, load_agent_config, render_agent_toml
from vcomp.agent.preferences.options import override_preferences
from vcomp.agent.preferences.settings import Preferences
from vcomp.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]

CUSTOM = Preferences(
    max_memory=1 << 30,
    run_if_user_active=False,
    user_idle_seconds=60,
    battery_below=20,
    battery_hysteresis=15,
    schedule="Mon-Fri 18:00-08:00, Sat-Sun all",
    max_upload_rate=100_000,
    max_download_rate=200_000,
)


def test_round_trip_through_agent_toml(tmp_path: Path) -> None:
    config = init_agent_home(tmp_path / "a", name="a")
    assert config.preferences == Preferences()
    custom = dataclasses.replace(config, preferences=CUSTOM)
    config.config_path.write_text(render_agent_toml(custom))
    assert load_agent_config(config.home).preferences == CUSTOM


def test_example_file_has_the_defaults() -> None:
    assert load_agent_config(REPO / "agent" / "agent.example.toml").preferences == Preferences()


def test_preferences_are_not_measured(tmp_path: Path) -> None:
    config = init_agent_home(tmp_path / "a", name="a")
    assert dataclasses.replace(config, preferences=CUSTOM).policy() == config.policy()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_memory = -1", "max_memory must be between"),
        ('max_memory = "2G"', "max_memory"),
        ("run_if_user_active = 1", "run_if_user_active"),
        ("battery_below = 101", "battery_below must be between"),
        ("battery_below = 95\nbattery_hysteresis = 10", "at most 100"),
        ('schedule = "Mon 25:00-26:00"', "not a time of day"),
        ("max_upload_rate = 1.5", "max_upload_rate"),
        ("colour = 1", "colour"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    config = init_agent_home(tmp_path / "a", name="a")
    config.config_path.write_text(
        config.config_path.read_text().split("[preferences]")[0] + "[preferences]\n" + line + "\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_agent_config(config.home)


def test_join_options_override_only_what_was_given() -> None:
    given = {"max_memory": 5, "schedule": None, "run_if_user_active": False}
    out = override_preferences(CUSTOM, given)
    assert out.max_memory == 5 and out.schedule == CUSTOM.schedule
    assert out.run_if_user_active is False
    with pytest.raises(ConfigError, match="schedule"):
        override_preferences(CUSTOM, {"schedule": "sometimes"})
