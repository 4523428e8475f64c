"""One vocabulary for sizes and durations, shared by both command lines and configs.

Sizes: a whole number of bytes, or with a binary suffix K, M, G or T (x1024; ``KiB``
and ``KB`` read the same): ``1048576``, ``512M``, ``2G``.
Durations: seconds, or with a suffix s, m or h: ``300``, ``90s``, ``5m``, ``1.5h``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import click

from vcomp.errors import ConfigError

__all__ = ["DURATION", "SIZE", "parse_duration", "parse_size"]

MAX_SIZE = 1 << 62
MAX_DURATION = 10 * 365 * 86400.0  # ten years: anything longer is a typo
_SIZE_RE = re.compile(r"(\d{1,19})\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_DURATION_RE = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)\s*([smh]?)", re.IGNORECASE)
_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """``512M`` -> 536870912; ConfigError naming the accepted forms otherwise."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a size like 536870912, 512M or 2G")
    power = " KMGT".index(match.group(2).upper() or " ")
    value = int(match.group(1)) << (10 * power)
    if value > MAX_SIZE:
        raise ConfigError(f"{text!r} is not a size: above {MAX_SIZE} bytes")
    return value


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``1.5h``, ``300`` -> seconds (> 0); ConfigError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a duration like 300, 90s, 5m or 1.5h")
    value = float(match.group(1)) * _SECONDS[match.group(2).lower()]
    if not (0 < value <= MAX_DURATION and math.isfinite(value)):
        raise ConfigError(f"{text!r} is not a duration: it must be above 0 and at most 10 years")
    return value


class _UnitType(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    def __init__(self, name: str, parse: Any) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default given as a number
        try:
            return self._parse(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _UnitType("size", parse_size)
DURATION = _UnitType("duration", parse_duration)
