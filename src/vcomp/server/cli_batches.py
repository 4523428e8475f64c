"""``vcomp-server batch cancel|retry``: the HTTP API's batch actions, for scripts."""

from __future__ import annotations

from pathlib import Path

import click

from vcomp.server.cli import config_option, main, open_store


@main.group()
def batch() -> None:
    """Cancel a batch, or submit its failed jobs again."""


@batch.command("cancel")
@click.argument("batch_id", type=click.IntRange(min=1))
@config_option
def batch_cancel(batch_id: int, config_path: Path) -> None:
    """Stop BATCH: its queued and running jobs end as cancelled.

    Jobs already running on an agent are not counted when their results arrive.
    """
    with open_store(config_path) as (_, store):
        cancelled = store.cancel_batch(batch_id)
    click.echo(f"batch {batch_id}: {cancelled} unfinished jobs cancelled")


@batch.command("retry")
@click.argument("batch_id", type=click.IntRange(min=1))
@config_option
def batch_retry(batch_id: int, config_path: Path) -> None:
    """Submit BATCH's failed jobs again, as a new batch with the same app and limits.

    Prints the new batch's id alone on stdout (nothing when no job failed).
    """
    with open_store(config_path) as (_, store):
        new, indices = store.retry_failed(batch_id)
    if new is None:
        click.echo(f"batch {batch_id}: no failed job to retry", err=True)
        return
    click.echo(f"batch {batch_id}: {len(indices)} failed jobs resubmitted as batch {new}", err=True)
    click.echo(new)
