"""JobLimits validation."""

from __future__ import annotations

import pytest

from vcomp.agent.sandbox.policy import JobLimits, MiB
from vcomp.errors import ConfigError

BASE = {"cpu_seconds": 1, "memory_bytes": 64 * MiB, "wall_seconds": 1.0, "output_bytes": 10}


def test_defaults() -> None:
    limits = JobLimits(**BASE)  # type: ignore[arg-type]
    assert limits.max_processes == 64 and limits.max_open_files == 64
    assert limits.max_file_bytes == 64 * MiB and limits.idle_seconds is None


@pytest.mark.parametrize(
    "change",
    [
        {"cpu_seconds": 0},
        {"cpu_seconds": 1.5},
        {"cpu_seconds": True},
        {"memory_bytes": -1},
        {"wall_seconds": 0},
        {"wall_seconds": float("nan")},
        {"wall_seconds": float("inf")},
        {"idle_seconds": -1.0},
        {"output_bytes": 1 << 32},
        {"max_open_files": 4},
        {"max_processes": 0},
    ],
)
def test_bad_values_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        JobLimits(**{**BASE, **change})  # type: ignore[arg-type]
