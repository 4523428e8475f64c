"""``vcomp-server enroll|allow-measurement``: which agents and which measurements the
organisation trusts."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vcomp.errors import ConfigError
from vcomp.server.cli import config_option, main, open_store

MAX_ENROL_FILE = 1 << 20


def _enrolment_lines(args: tuple[str, ...]) -> list[str]:
    if len(args) == 1 and args[0].startswith("@"):
        path = Path(args[0][1:])
        if path.stat().st_size > MAX_ENROL_FILE:
            raise ConfigError(f"{path}: larger than {MAX_ENROL_FILE} bytes")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise ConfigError(f"{path}: no enrolment line in it")
        return lines
    return [" ".join(args)]


@main.command()
@click.argument("line", nargs=-1, required=True)
@config_option
def enroll(line: tuple[str, ...], config_path: Path) -> None:
    """Register an agent from its enrolment line.

    LINE is what `vcomp-agent init` printed (quoted or not), or @FILE with one line per
    agent. Compare the agent id with the volunteer before trusting it.
    """
    from vcomp.agent.enrolment import parse_enrolment

    enrolments = [parse_enrolment(text) for text in _enrolment_lines(line)]
    with open_store(config_path) as (_, store):
        for e in enrolments:
            store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
            click.echo(f"enrolled agent {e.agent_id} ({e.name})")


@main.command("allow-measurement")
@click.argument("text", required=False)
@click.option("--note", default="", help="Why this measurement is allowed (e.g. the release).")
@click.option("--list", "list_", is_flag=True, help="Show the allowlist.")
@click.option("--remove", is_flag=True, help="Remove TEXT from the allowlist.")
@config_option
def allow_measurement(
    text: str | None, note: str, list_: bool, remove: bool, config_path: Path
) -> None:
    """Allow-list a golden measurement (or --list, --remove).

    Agents whose PCR 17/18 equal TEXT (the line `vcomp-agent measure` prints) may
    receive code.
    """
    from vcomp.protocol.attestation import Measurement

    if list_ == (text is not None) or (remove and list_):
        raise click.UsageError("give a measurement TEXT, or --list")
    with open_store(config_path) as (_, store):
        if list_:
            for m in store.list_measurements():
                added = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.added_at))
                click.echo(f"{m.text}  {added}  {m.note}".rstrip())
            return
        assert text is not None
        canonical = Measurement.parse(text).format()
        if remove:
            store.remove_measurement(canonical)
            click.echo(f"removed {canonical}")
        else:
            store.allow_measurement(canonical, note)
            click.echo(f"allowed {canonical}")
