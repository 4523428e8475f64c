"""``vcomp-server app add|retire|list``: the job code the organisation runs."""

from __future__ import annotations

from pathlib import Path

import click

from vcomp.server.cli import config_option, main, open_store
from vcomp.server.hooks import load as load_hook


@main.group()
def app() -> None:
    """Register and list job code."""


@app.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["python", "exec"]), required=True)
@click.option(
    "--validator",
    metavar="MODULE:FUNCTION",
    help="Decides whether replicas agree, instead of byte equality "
    "(e.g. vcomp.validators:json_close?rel_tol=1e-6).",
)
@click.option(
    "--assimilator",
    metavar="MODULE:FUNCTION",
    help="Called (at least once) with each done job's canonical output.",
)
@config_option
def app_add(
    name: str,
    file: Path,
    kind: str,
    validator: str | None,
    assimilator: str | None,
    config_path: Path,
) -> None:
    """Store FILE as the next version of app NAME.

    Hooks are named MODULE:FUNCTION[?key=value&...] and run inside `vcomp-server serve`
    (the module must be importable there; it is imported here to check). A validator is
    called as fn([output_a, output_b], **options) and returns the canonical output (one
    of them) or vcomp.validators.DISAGREE, for each pair of a job's replicas. An
    assimilator is called as fn(job, output, **options) at least once per done job
    (again after a crash or restart before it returned); one that raises is retried
    with backoff and `status` shows its error. Both run on hook threads
    ([server] hook_threads each), never holding up dispatch.
    """
    for hook in (validator, assimilator):
        if hook is not None:
            load_hook(hook)  # a HookError names what is wrong
    with open_store(config_path) as (_, store):
        a = store.add_app(name, kind, file, validator=validator, assimilator=assimilator)
    click.echo(
        f"app {a.name} version {a.version} ({a.kind}): {a.size} bytes sha256 {a.sha256.hex()}"
    )


@app.command("retire")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@config_option
def app_retire(name: str, version: int, config_path: Path) -> None:
    """Refuse VERSION of app NAME to new batches (batches made with it run on).

    `submit` without --app-version then takes the newest version not retired.
    """
    with open_store(config_path) as (_, store):
        a = store.retire_app(name, version)
    click.echo(f"app {a.name} version {a.version} retired")


@app.command("list")
@config_option
def app_list(config_path: Path) -> None:
    """Show every app version."""
    with open_store(config_path) as (_, store):
        for a in store.list_apps():
            hooks = "".join(
                f"  {what} {hook}"
                for what, hook in (("validator", a.validator), ("assimilator", a.assimilator))
                if hook is not None
            )
            click.echo(
                f"{a.name}  v{a.version}  {a.kind}  {a.size} bytes  {a.sha256.hex()[:16]}{hooks}"
            )
