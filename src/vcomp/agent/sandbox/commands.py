"""``vcomp-agent doctor`` and ``vcomp-agent sandbox-run``, as plain functions."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from vcomp.agent.modes import ExecutionMode, agent_setup, sched_idle_available
from vcomp.agent.preferences.doctor import preference_report
from vcomp.agent.preferences.settings import Preferences
from vcomp.agent.sandbox.outcome import EXIT_CODES, OutcomeKind, Protection
from vcomp.agent.sandbox.policy import JobLimits, MiB
from vcomp.agent.sandbox.protections import REQUIRED_PROTECTIONS
from vcomp.agent.sandbox.runner import JobKind, Sandbox
from vcomp.agent.sandbox.seccomp import libseccomp_version
from vcomp.udp_offload import probe_loopback

EXIT_DOCTOR_INSUFFICIENT = 1
EXIT_USAGE = 2

SANDBOX_RUN_EXIT_HELP = "Exit codes: " + ", ".join(
    f"{code} {kind.value}" for kind, code in EXIT_CODES.items()
)


def doctor(
    out: IO[str], *, work_root: Path | None = None, preferences: Preferences | None = None
) -> int:
    """Print every protection as active / unavailable / failed; nonzero if the minimum
    (rlimits, cleared environment, process-tree kill, unprivileged uid) is missing.
    Then the volunteer's rules (``preferences``, default: agent.toml's defaults).
    """
    out.write(f"kernel   {platform.system()} {platform.release()} ({platform.machine()})\n")
    out.write(f"python   {sys.executable} {platform.python_version()}\n")
    out.write(f"agent    uid {os.geteuid()}\n")
    out.write(f"libseccomp {libseccomp_version() or 'not found'}\n")
    out.write(f"SCHED_IDLE {'available' if sched_idle_available() else 'unavailable'}\n\n")
    if sys.platform != "linux":
        out.write("sandbox  unavailable: it needs Linux\n")
        return EXIT_DOCTOR_INSUFFICIENT
    with tempfile.TemporaryDirectory(prefix="vcomp-doctor-") as tmp:
        sandbox = Sandbox(work_root=work_root or Path(tmp))
        prots = sandbox.protections()
    width = max(len(p.name) for p in prots)
    for p in prots:
        out.write(f"{p.name:<{width}}  {p.status:<11}  {p.reason}\n")
    _write_preferences(out, preferences or Preferences())
    _write_network(out)
    missing = minimum_missing(prots)
    if missing:
        out.write(f"\nINSUFFICIENT: not active: {', '.join(missing)}\n")
        return EXIT_DOCTOR_INSUFFICIENT
    out.write("\nminimum guarantees present\n")
    return 0


def _write_preferences(out: IO[str], prefs: Preferences) -> None:
    out.write("\npreferences\n")
    rows = preference_report(prefs)
    width = max(len(name) for name, _, _ in rows)
    for name, status, reason in rows:
        out.write(f"{name:<{width}}  {status:<11}  {reason}\n")


def _write_network(out: IO[str]) -> None:
    # Probed with a real train over loopback; the agent's socket probes again at join.
    gso, gro = probe_loopback()
    out.write("\nnetwork\n")
    for name, state in (("udp gso", gso), ("udp gro", gro)):
        out.write(f"{name:<7}  {state.status:<11}  {state.reason}\n")


def minimum_missing(prots: Sequence[Protection]) -> list[str]:
    active = {p.name for p in prots if p.status == "active"}
    failed = [p.name for p in prots if p.name == "setup"]
    return [name for name in REQUIRED_PROTECTIONS if name not in active] + failed


def sandbox_run(
    program: Path,
    *,
    kind: JobKind,
    input_path: Path | None,
    cpu_seconds: int = 60,
    memory_bytes: int = 1024 * MiB,
    wall_seconds: float = 300.0,
    output_bytes: int = 16 * MiB,
    idle_seconds: float | None = None,
    mode: ExecutionMode | None = None,
    work_root: Path | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one job exactly as the agent would; result bytes to stdout, outcome JSON to
    stderr, and an exit code per outcome class (see SANDBOX_RUN_EXIT_HELP).
    """
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr
    code = program.read_bytes()
    data = input_path.read_bytes() if input_path is not None else b""
    limits = JobLimits(
        cpu_seconds=cpu_seconds,
        memory_bytes=memory_bytes,
        wall_seconds=wall_seconds,
        output_bytes=output_bytes,
        idle_seconds=idle_seconds,
    )
    if mode is not None:
        agent_setup(mode)
    with tempfile.TemporaryDirectory(prefix="vcomp-run-") as tmp:
        # One job only: no launcher to prepare for a next one.
        sandbox = Sandbox(work_root=work_root or Path(tmp), mode=mode, prespawn=False)
        outcome = asyncio.run(sandbox.run(kind=kind, code=code, input=data, limits=limits))
    if outcome.result is not None:
        out.write(outcome.result)
        out.flush()
    summary = outcome.to_json_dict()
    summary["protections"] = {p.name: p.status for p in outcome.protections}
    err.write(json.dumps(summary, sort_keys=True) + "\n")
    err.flush()
    return EXIT_CODES[OutcomeKind(outcome.kind)]
