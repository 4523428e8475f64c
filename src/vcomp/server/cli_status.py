"""``vcomp-server status``: agents, jobs and batches at a glance (or as JSON)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from vcomp.server import status_notes
from vcomp.server.cli import config_option, main, open_store
from vcomp.server.store import JobState, StoreStatus


def _status_json(status: StoreStatus, agents: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "agents": agents,
        "jobs": {state.value: status.jobs.get(state, 0) for state in JobState},
        "batches": [
            {
                "batch_id": b.batch_id,
                "app": b.app_name,
                "app_version": b.app_version,
                "created_at": b.created_at,
                "deadline": b.deadline,
                "total": b.total,
                "queued": b.queued,
                "leased": b.leased,
                "done": b.done,
                "failed": b.failed,
                "cancelled": b.cancelled,
                "disagreements": b.disagreements,
                "finished": b.finished,
            }
            for b in status.batches
        ],
    }


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never seen"
    seconds = max(0.0, now - when)
    if seconds < 120:
        return f"seen {seconds:.0f}s ago"
    if seconds < 7200:
        return f"seen {seconds / 60:.0f}m ago"
    return f"seen {seconds / 3600:.0f}h ago"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
@config_option
def status(as_json: bool, config_path: Path) -> None:
    """Show agents, jobs and batches."""
    with open_store(config_path) as (config, store):
        st = store.status()
        agents = store.list_agents()
        notes = status_notes.gather(store, st, config.jobs)
    if as_json:
        rows = [
            {
                "agent_id": a.agent_id,
                "name": a.name,
                "enrolled_at": a.enrolled_at,
                "last_seen": a.last_seen,
                "address": a.address,
            }
            for a in agents
        ]
        click.echo(json.dumps(_status_json(st, rows) | status_notes.notes_json(notes), indent=2))
        return
    now = time.time()
    click.echo(f"agents: {len(agents)} enrolled")
    for a in agents:
        line = f"  {a.agent_id[:16]}  {a.name}  {_ago(a.last_seen, now)}  {a.address or ''}"
        click.echo(line.rstrip())
    click.echo("jobs: " + ", ".join(f"{s.value} {st.jobs.get(s, 0)}" for s in JobState))
    click.echo(f"batches: {len(st.batches)}")
    for b in st.batches:
        state = "cancelled" if b.cancelled_at else "finished" if b.finished else "running"
        click.echo(
            f"  #{b.batch_id}  {b.app_name} v{b.app_version}  "
            f"{b.done + b.failed + b.cancelled}/{b.total}  "
            f"(done {b.done}, failed {b.failed}, leased {b.leased}, queued {b.queued}"
            + (f", cancelled {b.cancelled}" if b.cancelled else "")
            + (f", disagreements {b.disagreements}" if b.disagreements else "")
            + f")  {state}"
        )
    for line in status_notes.notes_text(notes):
        click.echo(line)
