"""Limits of one job, and the sandbox's fixed choices (uids, paths, environment)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vcomp.errors import ConfigError

MiB = 1 << 20

# The job's whole environment; nothing of the agent's leaks through.
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
NOBODY = 65534


@dataclass(frozen=True, slots=True)
class JobLimits:
    """Resource limits of one job.

    ``cpu_seconds`` holds for the whole process tree (each process also gets it as
    RLIMIT_CPU); ``memory_bytes`` is each process's address space (RLIMIT_AS);
    ``wall_seconds`` excludes time the execution mode kept the job suspended;
    ``output_bytes`` bounds the RESULT payload; ``idle_seconds`` is the longest
    silence (no frame) allowed; ``log_bytes`` bounds stdout and stderr each;
    ``disk_bytes`` bounds the job's work directory (bytes written there, in RAM).
    """

    cpu_seconds: int
    memory_bytes: int
    wall_seconds: float
    output_bytes: int
    idle_seconds: float | None = None
    max_processes: int = 64
    max_open_files: int = 64
    max_file_bytes: int = 64 * MiB
    log_bytes: int = 1 * MiB
    disk_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        _positive_int("cpu_seconds", self.cpu_seconds)
        _positive_int("memory_bytes", self.memory_bytes)
        _positive_int("output_bytes", self.output_bytes, zero_ok=True)
        _positive_int("max_processes", self.max_processes)
        _positive_int("max_open_files", self.max_open_files)
        _positive_int("max_file_bytes", self.max_file_bytes, zero_ok=True)
        _positive_int("log_bytes", self.log_bytes, zero_ok=True)
        _positive_int("disk_bytes", self.disk_bytes)
        _positive_seconds("wall_seconds", self.wall_seconds)
        if self.idle_seconds is not None:
            _positive_seconds("idle_seconds", self.idle_seconds)
        if self.output_bytes > 0xFFFF_FFFF:
            raise ConfigError("output_bytes must fit a u32 frame length")
        if self.max_open_files < 8:
            raise ConfigError("max_open_files must be at least 8 (the job's pipes need 5)")


def _positive_int(name: str, value: object, *, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name} must be positive, got {value}")


def _positive_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not 0 < value < math.inf:
        raise ConfigError(f"{name} must be positive and finite, got {value}")
