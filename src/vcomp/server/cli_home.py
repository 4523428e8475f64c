"""``vcomp-server init|migrate|serve``: make a server home, bring its store's schema up to
date, and run the server."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from vcomp.server.cli import config_option, main
from vcomp.server.config import (
    CONFIG_FILE,
    KEY_FILE,
    PUBLIC_FILE,
    init_server_home,
    load_server_config,
)
from vcomp.server.store.url import migrate_store, redact_store_url


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Re-initialise a non-empty DIR: server.toml back to defaults (the old one kept as "
    "server.toml.bak); the organisation key and the job store are kept.",
)
@click.option(
    "--new-key",
    is_flag=True,
    help="With --force: replace the organisation key. Every agent must then re-pin the new "
    "key; asks first on a terminal.",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="The job store: sqlite:PATH (relative to DIR) or sqlite:///ABS/PATH "
    "[default: sqlite:jobs.sqlite].",
)
def init(directory: Path, force: bool, new_key: bool, store_url: str | None) -> None:
    """Create a server home in DIRECTORY.

    Writes server.toml, server.key (0600) and server.pub, creates the job store
    (jobs.sqlite unless --store names another) at the current schema version, and
    prints the key fingerprint that agents pin.

    With --force an existing store is kept (and upgraded), never emptied, and so is
    server.key unless --new-key is given too.
    """
    had_key = (directory / KEY_FILE).exists()
    replacing = new_key and force and had_key
    if replacing and sys.stdin.isatty():
        click.confirm(
            f"Replace the organisation key in {directory}? Every agent pinned to it will "
            "refuse this server until it re-pins the new key",
            default=False,
            abort=True,
        )
    fingerprint = init_server_home(directory, force=force, new_key=new_key, store_url=store_url)
    click.echo(f"server home: {directory}")
    click.echo(f"fingerprint: {fingerprint}")
    if replacing:
        click.echo(
            "NEW organisation key: every agent must re-pin it before it trusts this server:\n"
            f'  server_key = "{fingerprint}" in its agent.toml, or\n'
            f"  vcomp-agent init AGENT_DIR --force --server HOST:PORT --server-key {fingerprint}\n"
            "  (which keeps the agent's identity and enrolment)."
        )
        return
    if force and had_key:
        click.echo(
            "kept the organisation key and the job store; server.toml is back to the "
            f"defaults (the previous one, if any, is {directory / (CONFIG_FILE + '.bak')})"
        )
    port = load_server_config(directory).bind_port
    click.echo(
        f"Agents pin this key: vcomp-agent init AGENT_DIR --server HOST:{port} "
        f"--server-key {fingerprint}\n"
        f"(HOST: this server's address as volunteers reach it; {directory / PUBLIC_FILE} "
        f"holds the same fingerprint). Then: vcomp-server serve --config {directory}"
    )


@main.command()
@config_option
def migrate(config_path: Path) -> None:
    """Create the job store, or upgrade its schema to this vcomp's version.

    Stop `serve` first; the other commands refuse a store at another version.
    """
    config = load_server_config(config_path)
    before, now = migrate_store(config.store_url)
    if before == now:
        click.echo(f"job store {redact_store_url(config.store_url)}: schema v{now}, up to date")
    else:
        click.echo(f"job store {redact_store_url(config.store_url)}: schema v{before} -> v{now}")


@main.command()
@config_option
@click.option(
    "--bind",
    metavar="HOST:PORT",
    help="Listen here instead of the configured [server] bind (two servers, one home).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append the log here instead of stderr; reopened when logrotate moves it.",
)
@click.option(
    "--http-bind",
    metavar="HOST:PORT",
    help='Serve the HTTP API here instead of the configured [http] bind ("" turns it off).',
)
def serve(
    config_path: Path, bind: str | None, log_file: Path | None, http_bind: str | None
) -> None:
    """Run the server (uvloop) until SIGINT or SIGTERM."""
    from vcomp.server.config import load_signing_key
    from vcomp.server.service import serve as run_server
    from vcomp.tomlconfig import parse_host_port

    config = load_server_config(config_path)
    if bind is not None:
        host, port = parse_host_port(bind, what="--bind", allow_zero=True)
        config = dataclasses.replace(config, bind_host=host, bind_port=port)
    if http_bind is not None:
        http = dataclasses.replace(config.http, bind=http_bind)  # checked again here
        config = dataclasses.replace(config, http=http)
    load_signing_key(config.key_path)  # fail here, readably, on a bad or exposed key
    run_server(config, log_file=log_file)
