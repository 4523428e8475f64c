"""``vcomp-server agents`` and ``agent revoke``: who volunteers, and withdrawing trust."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vcomp.server.cli import config_option, find_agent, main, open_store
from vcomp.server.store.records import CONNECTED_SECONDS


@main.command()
@config_option
def agents(config_path: Path) -> None:
    """List agents: connected now or last seen, jobs done and CPU-seconds donated."""
    with open_store(config_path) as (_, store):
        listed = store.list_agents()
        credit = store.agent_credit()
    if not listed:
        click.echo("no agents enrolled")
    now = time.time()
    for a in listed:
        given = credit.get(a.agent_id)
        if a.revoked_at is not None:
            state = "revoked"
        elif a.last_seen is not None and now - a.last_seen <= CONNECTED_SECONDS:
            state = "connected"
        elif a.last_seen is None:
            state = "never seen"
        else:
            state = f"seen {now - a.last_seen:.0f} s ago"
        jobs, cpu = (given.jobs_done, given.cpu_seconds) if given else (0, 0.0)
        click.echo(f"{a.agent_id[:16]}  {a.name}  {state}  {jobs} jobs  {cpu:.1f} CPU-s")


@main.group()
def agent() -> None:
    """Act on one enrolled agent."""


@agent.command("revoke")
@click.argument("agent_name")
@config_option
def agent_revoke(agent_name: str, config_path: Path) -> None:
    """Refuse AGENT's key from now on (an id, a unique id prefix, or its name).

    A running server ends the agent's sessions within a second; its leased jobs go
    to other agents when their leases lapse.
    """
    with open_store(config_path) as (_, store):
        target = store.revoke_agent(find_agent(store, agent_name).agent_id)
    click.echo(f"agent {target.agent_id} ({target.name}) revoked")
