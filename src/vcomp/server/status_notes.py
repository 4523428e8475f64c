"""What ``vcomp-server status`` says beyond counts: the failed jobs and their reasons,
hook errors, why replicas wait, and the defaults ``submit`` takes from server.toml.

Kept apart from the command line so the text and the JSON come from one gathering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vcomp.server.config import JobDefaults
from vcomp.server.store import HookFailure, Job, Store, StoreStatus

FAILED_PER_BATCH = 5  # failed jobs listed per batch (the rest: `results BATCH`)
HOOK_FAILURES = 10


def replica_wait(replicas: int, enrolled: int) -> str | None:
    """Why a job's replicas wait, or None: each replica goes to a distinct agent."""
    if replicas <= enrolled:
        return None
    return f"each job needs {replicas} distinct agents, {enrolled} enrolled"


def replica_warning(replicas: int, enrolled: int) -> str | None:
    """What ``submit`` warns when the batch cannot finish with the agents enrolled."""
    if replicas <= enrolled:
        return None
    return (
        f"warning: {replicas} replicas of a job go to {replicas} distinct agents; "
        f"{enrolled} enrolled, so its jobs wait until more agents enrol"
    )


@dataclass(frozen=True, slots=True)
class StatusNotes:
    failed: tuple[Job, ...]  # newest batches first
    hook_failures: tuple[HookFailure, ...]
    replica_waits: tuple[tuple[int, str], ...]  # (batch, why)
    defaults: JobDefaults


def gather(store: Store, status: StoreStatus, defaults: JobDefaults) -> StatusNotes:
    failed: list[Job] = []
    waits: list[tuple[int, str]] = []
    for b in reversed(status.batches):
        if b.failed:
            failed.extend(store.failed_jobs(b.batch_id, FAILED_PER_BATCH))
        if not b.finished:
            why = replica_wait(store.get_batch(b.batch_id).replicas, status.agents)
            if why is not None:
                waits.append((b.batch_id, why))
    return StatusNotes(
        tuple(failed), tuple(store.hook_failures(HOOK_FAILURES)), tuple(waits), defaults
    )


def notes_json(notes: StatusNotes) -> dict[str, Any]:
    return {
        "failed_jobs": [
            {"batch_id": j.batch_id, "index": j.index, "job_id": j.job_id, "reason": j.reason}
            for j in notes.failed
        ],
        "hook_failures": [dataclasses.asdict(f) for f in notes.hook_failures],
        "replica_waits": [{"batch_id": b, "reason": why} for b, why in notes.replica_waits],
        "submit_defaults": dataclasses.asdict(notes.defaults),
    }


def notes_text(notes: StatusNotes) -> list[str]:
    lines: list[str] = []
    if notes.failed:
        lines.append(f"failed jobs (up to {FAILED_PER_BATCH} a batch; all: `results BATCH`):")
        lines.extend(f"  #{j.batch_id} job {j.index}: {j.reason}" for j in notes.failed)
    if notes.hook_failures:
        lines.append("hook errors (the job is kept; assimilators are retried):")
        for f in notes.hook_failures:
            lines.append(f"  #{f.batch_id} job {f.index}: {f.error} (tries {f.tries})")
    if notes.replica_waits:
        lines.append("batches waiting for agents:")
        lines.extend(f"  #{b}: replicas wait: {why}" for b, why in notes.replica_waits)
    d = notes.defaults
    lines.append(
        "submit defaults (server.toml [jobs]): "
        f"replicas {d.replicas}, quorum {d.quorum}, max_attempts {d.max_attempts}, "
        f"cpu_seconds {d.cpu_seconds}, memory_bytes {d.memory_bytes}, "
        f"wall_seconds {d.wall_seconds:g}, output_bytes {d.output_bytes}, "
        f"disk_bytes {d.disk_bytes}, stop_after_same_failures {d.stop_after_same_failures}"
    )
    return lines
