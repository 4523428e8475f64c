"""``vcomp-server agents``, ``agent revoke`` and ``reset``: who volunteers, withdrawing
trust, and asking the running server to RESET one."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from vcomp.errors import ConfigError
from vcomp.server.cli import config_option, main, open_store
from vcomp.server.store import AgentRecord, Store
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


def find_agent(store: Store, text: str) -> AgentRecord:
    """The one enrolled agent ``text`` names: its id, a unique id prefix, or its name."""
    agents = store.list_agents()
    key = text.strip().lower()
    matches = [a for a in agents if a.agent_id == key]
    if not matches and re.fullmatch(r"[0-9a-f]{4,64}", key):
        matches = [a for a in agents if a.agent_id.startswith(key)]
    if not matches:
        matches = [a for a in agents if a.name == text.strip()]
    if not matches:
        raise ConfigError(f"no enrolled agent matches {text!r}")
    if len(matches) > 1:
        names = ", ".join(f"{a.agent_id[:16]} ({a.name})" for a in matches)
        raise ConfigError(f"{text!r} matches several agents: {names}")
    return matches[0]


@main.command()
@click.argument("agent")
@config_option
def reset(agent: str, config_path: Path) -> None:
    """Ask the running server to RESET an agent.

    AGENT is an agent id, a unique id prefix, or a name.

    The agent aborts its job, which is re-run or reassigned.
    """
    with open_store(config_path) as (_, store):
        target = find_agent(store, agent)
        store.request_reset(target.agent_id)
    click.echo(
        f"reset requested for agent {target.agent_id} ({target.name}); "
        "every running server with a session of it resets it within a second"
    )
