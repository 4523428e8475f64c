"""The ``join`` options that override ``[preferences]`` (one per key of agent.toml)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vcomp.agent.preferences.settings import MAX_RATE, Preferences
from vcomp.units import SIZE

_F = TypeVar("_F", bound=Callable[..., Any])

# (option, parameter, click type, help). Parameters are the Preferences field names.
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--max-memory", "max_memory", SIZE,
     "Bytes all running jobs may hold together, or 512M, 2G (x1024; 0: no cap)."),
    ("--run-if-user-active/--no-run-if-user-active", "run_if_user_active", bool,
     "With --no-...: run jobs only while keyboard and mouse are idle."),
    ("--user-idle-seconds", "user_idle_seconds", click.IntRange(1, 7 * 24 * 3600),
     "Input idle this long before jobs run (with --no-run-if-user-active)."),
    ("--battery-below", "battery_below", click.IntRange(0, 100),
     "Stop jobs below this battery percentage (0: never)."),
    ("--battery-hysteresis", "battery_hysteresis", click.IntRange(0, 100),
     "Percent above --battery-below before jobs go on."),
    ("--schedule", "schedule", str,
     'When jobs may run, e.g. "Mon-Fri 18:00-08:00, Sat-Sun all".'),
    ("--max-upload-rate", "max_upload_rate", click.IntRange(0, MAX_RATE),
     "Bytes per second sent, all sessions together (0: no cap)."),
    ("--max-download-rate", "max_download_rate", click.IntRange(0, MAX_RATE),
     "Bytes per second received, all sessions together (0: no cap)."),
)  # fmt: skip


def preference_options(f: _F) -> _F:
    for flag, name, kind, text in reversed(_OPTIONS):
        if kind is bool:
            f = click.option(flag, name, default=None, help=text)(f)
        else:
            f = click.option(flag, name, type=kind, default=None, help=text)(f)
    return f


def override_preferences(prefs: Preferences, given: dict[str, Any]) -> Preferences:
    """``prefs`` with every option the volunteer gave (None: not given) replaced."""
    changes = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(prefs, **changes) if changes else prefs
