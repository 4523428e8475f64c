"""Operator hooks the hook tests name (``tests.integration.hookfns:record?log=PATH``).

They leave their traces in files, as an organisation's own code would, so a test
counts calls by reading what they wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from vcomp.server.hooks import HookJob
from vcomp.validators import DISAGREE, Disagree


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def record(job: HookJob, output: bytes, *, log: str) -> None:
    """Append "job_id index output-hex" for each call."""
    _append(log, f"{job.job_id} {job.index} {output.hex()}")


def flaky(job: HookJob, output: bytes, *, log: str, fail: int) -> None:
    """Raise on the first ``fail`` calls for each job, then record it."""
    tries = Path(f"{log}.{job.job_id}.tries")
    n = int(tries.read_text()) if tries.exists() else 0
    tries.write_text(str(n + 1))
    if n < fail:
        raise RuntimeError(f"flaky hook, call {n + 1} of job {job.index}")
    record(job, output, log=log)


def gate(job: HookJob, output: bytes, *, log: str, gate: str) -> None:
    """Say it was entered, then block until the file ``gate`` exists (at most 120 s)."""
    _append(f"{log}.entered", str(job.job_id))
    stop = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < stop:
        time.sleep(0.02)
    record(job, output, log=log)


def broken_validator(outputs: Sequence[bytes]) -> bytes | Disagree:
    raise RuntimeError("validator bug")


def first_always(outputs: Sequence[bytes]) -> bytes | Disagree:
    """Agrees with anything (returns an output that is not one of them if told)."""
    return outputs[0] if outputs else DISAGREE


def not_an_output(outputs: Sequence[bytes]) -> bytes | Disagree:
    return b"made up"


def gate_validator(outputs: Sequence[bytes], *, log: str, gate: str) -> bytes | Disagree:
    """Say it was entered, block until the file ``gate`` exists, then agree on bytes."""
    _append(f"{log}.entered", str(len(outputs)))
    stop = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < stop:
        time.sleep(0.02)
    return outputs[0] if all(o == outputs[0] for o in outputs) else DISAGREE
