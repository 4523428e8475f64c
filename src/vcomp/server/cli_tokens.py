"""``vcomp-server token create|list|revoke``: bearer tokens for the HTTP API."""

from __future__ import annotations

import time
from pathlib import Path

import click

from vcomp.server.cli import config_option, main, open_store
from vcomp.server.http.auth import new_token, token_digest
from vcomp.server.store.records import SCOPES


@main.group()
def token() -> None:
    """Create, list and revoke HTTP API tokens."""


@token.command("create")
@click.argument("name")
@click.option(
    "--scope",
    type=click.Choice(SCOPES),
    required=True,
    help="read: look; submit: also create, cancel and retry batches; admin: also apps, "
    "agents and tokens.",
)
@config_option
def token_create(name: str, scope: str, config_path: Path) -> None:
    """Create a token NAME and print it (once: only its hash is stored)."""
    secret = new_token()
    with open_store(config_path) as (_, store):
        store.create_token(name, scope, token_digest(secret))
    click.echo(f"token {name!r} ({scope}); shown only now, keep it secret:", err=True)
    click.echo(secret)


@token.command("list")
@config_option
def token_list(config_path: Path) -> None:
    """List tokens: name, scope, created, revoked."""
    with open_store(config_path) as (_, store):
        tokens = store.list_tokens()
    if not tokens:
        click.echo("no tokens; create one with `vcomp-server token create NAME --scope read`")
    for t in tokens:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created_at))
        state = "live" if t.revoked_at is None else "revoked"
        click.echo(f"{t.name}  {t.scope}  created {created} UTC  {state}")


@token.command("revoke")
@click.argument("name")
@config_option
def token_revoke(name: str, config_path: Path) -> None:
    """Refuse the token NAME from now on."""
    with open_store(config_path) as (_, store):
        store.revoke_token(name)
    click.echo(f"token {name!r} revoked")
