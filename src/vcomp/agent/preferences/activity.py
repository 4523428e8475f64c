"""Is the volunteer using the machine? Seconds since the last keyboard or mouse input.

Sources, first that works wins (``vcomp-agent doctor`` says which):

1. ``x11``: the X screensaver extension's idle time (libXss through ctypes) when
   ``$DISPLAY`` is set and the library is installed.
2. ``logind``: ``IdleHint`` / ``IdleSinceHintMonotonic`` of the user sessions that
   logind knows (``loginctl``), for desktops that report idleness to logind.
3. ``cpu``: no input device can be seen (a server, a container, a Wayland session
   without idle reporting): CPU use by anything but vcomp's jobs above
   ``BUSY_SHARE`` of the machine counts as the owner being active.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from vcomp.agent.cpu_monitor import CpuTimes, foreign_fraction

BUSY_SHARE = 0.25  # BOINC's suspend_cpu_usage default
LOGINCTL_TIMEOUT = 5.0
MAX_SESSIONS = 64
USER_SESSION_TYPES = ("x11", "wayland", "mir", "tty")


@dataclass(frozen=True, slots=True)
class IdleReading:
    """Seconds since the last input (None: unknown from this source)."""

    source: str
    idle_seconds: float | None
    detail: str = ""


# ---------------------------------------------------------------------- logind


def parse_show_session(text: str) -> dict[str, str]:
    """``loginctl show-session ID -p ...`` output: KEY=VALUE lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def logind_idle_seconds(sessions: list[dict[str, str]], now_monotonic_us: int) -> float | None:
    """Idle time of the least idle user session (None: no user session to judge by)."""
    idle: list[float] = []
    for props in sessions:
        if props.get("Class") != "user" or props.get("Type") not in USER_SESSION_TYPES:
            continue
        if props.get("IdleHint") != "yes":
            idle.append(0.0)
            continue
        try:
            since = int(props.get("IdleSinceHintMonotonic", "0"))
        except ValueError:
            since = 0
        idle.append(max(0.0, (now_monotonic_us - since) / 1e6) if since else 0.0)
    return min(idle) if idle else None


def _loginctl(*args: str) -> str | None:
    exe = shutil.which("loginctl")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=LOGINCTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def read_logind() -> IdleReading:
    listing = _loginctl("list-sessions", "--no-legend")
    if listing is None:
        return IdleReading("logind", None, "loginctl missing or logind not running")
    ids = [line.split()[0] for line in listing.splitlines() if line.split()][:MAX_SESSIONS]
    sessions = []
    for sid in ids:
        text = _loginctl(
            "show-session", sid, "-p", "Class", "-p", "Type", "-p", "IdleHint",
            "-p", "IdleSinceHintMonotonic",
        )  # fmt: skip
        if text is not None:
            sessions.append(parse_show_session(text))
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    idle = logind_idle_seconds(sessions, now_us)
    return IdleReading("logind", idle, "" if idle is not None else "no user session")


# ---------------------------------------------------------------------- X11


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),
        ("event_mask", ctypes.c_ulong),
    ]


def read_x11() -> IdleReading:
    display_name = os.environ.get("DISPLAY")
    if not display_name:
        return IdleReading("x11", None, "no $DISPLAY")
    x11_name, xss_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
    if x11_name is None or xss_name is None:
        return IdleReading("x11", None, "libX11 or libXss not installed")
    try:
        x11, xss = ctypes.CDLL(x11_name), ctypes.CDLL(xss_name)
        x11.XOpenDisplay.restype = ctypes.c_void_p
        x11.XDefaultRootWindow.restype = ctypes.c_ulong
        x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        xss.XScreenSaverQueryInfo.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.POINTER(_XScreenSaverInfo),
        ]
    except (OSError, AttributeError) as exc:
        return IdleReading("x11", None, f"cannot load the X screensaver extension: {exc}")
    display = x11.XOpenDisplay(display_name.encode())
    if not display:
        return IdleReading("x11", None, f"cannot open display {display_name}")
    try:
        info = xss.XScreenSaverAllocInfo()
        if not info or not xss.XScreenSaverQueryInfo(
            display, x11.XDefaultRootWindow(display), info
        ):
            return IdleReading("x11", None, "the X server has no screensaver extension")
        idle = info.contents.idle / 1000.0
        x11.XFree(info)
        return IdleReading("x11", idle)
    finally:
        x11.XCloseDisplay(display)


# ---------------------------------------------------------------------- CPU fallback


class CpuActivity:
    """The fallback: the owner counts as active while foreign CPU use is above BUSY_SHARE."""

    def __init__(self, now: float) -> None:
        self._last_busy = now - 365 * 24 * 3600.0  # idle since "long ago" at start
        self._before: CpuTimes | None = None
        self._own_before = 0.0

    def feed(self, times: CpuTimes, own_cpu_seconds: float, now: float) -> IdleReading:
        """One sample of machine CPU and of vcomp's own jobs; returns the idle time."""
        if self._before is not None:
            share = foreign_fraction(self._before, times, own_cpu_seconds - self._own_before)
            if share > BUSY_SHARE:
                self._last_busy = now
        self._before, self._own_before = times, own_cpu_seconds
        return IdleReading("cpu", max(0.0, now - self._last_busy), "foreign CPU load")


def input_source() -> IdleReading:
    """The first input-idle source that answers on this machine, or a reading saying why none."""
    reasons = []
    for read in (read_x11, read_logind):
        reading = read()
        if reading.idle_seconds is not None:
            return reading
        reasons.append(f"{reading.source}: {reading.detail}")
    return IdleReading("cpu", None, "; ".join(reasons))
