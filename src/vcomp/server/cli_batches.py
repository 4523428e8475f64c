"""``vcomp-server submit|wait|batch cancel|retry``: create a batch, follow it to its end,
and the HTTP API's batch actions, for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from vcomp.errors import ConfigError
from vcomp.server import status_notes
from vcomp.server.cli import config_option, main, open_store
from vcomp.server.store.checks import MAX_BLOB_BYTES
from vcomp.units import DURATION, SIZE

EXIT_FAILED_JOBS = 3
EXIT_TIMEOUT = 4


def _jsonl_inputs(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_BLOB_BYTES + 1), b""), 1):
            if len(raw) > MAX_BLOB_BYTES:
                raise ConfigError(f"{path}:{number}: line longer than {MAX_BLOB_BYTES} bytes")
            line = raw.strip()
            if not line:
                continue
            try:
                json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{number}: not JSON: {exc}") from None
            yield line


def _dir_inputs(path: Path) -> Iterator[bytes]:
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    for file in files:
        if file.stat().st_size > MAX_BLOB_BYTES:
            raise ConfigError(f"{file}: larger than {MAX_BLOB_BYTES} bytes")
        yield file.read_bytes()


@main.command()
@click.argument("app_name", metavar="APP")
@click.option(
    "--inputs",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="FILE.jsonl (each non-empty line is one input) or DIR (each file, by name).",
)
@click.option("--app-version", type=click.IntRange(min=1), help="[default: latest]")
@click.option(
    "--replicas", type=click.IntRange(min=1), help="Copies of each job on distinct agents."
)
@click.option(
    "--quorum",
    type=click.IntRange(min=1),
    help="Agreeing results needed [default: [jobs] quorum, or a majority with --replicas].",
)
@click.option("--max-attempts", type=click.IntRange(min=1))
@click.option("--deadline", type=DURATION, help="From now: seconds, or 90s, 5m, 1h.")
@click.option("--cpu-seconds", type=click.IntRange(min=1))
@click.option("--memory", type=SIZE, help="Bytes, or 512M, 2G (x1024).")
@click.option(
    "--wall", "--wall-seconds", "wall_seconds", type=DURATION, help="Seconds, or 90s, 5m, 1h."
)
@click.option("--output-bytes", type=SIZE, help="Bytes, or 512K, 1M (x1024).")
@click.option("--disk-bytes", type=SIZE, help="Job work directory: bytes, or 64M, 1G (x1024).")
@config_option
def submit(
    app_name: str,
    inputs: Path,
    app_version: int | None,
    replicas: int | None,
    quorum: int | None,
    max_attempts: int | None,
    deadline: float | None,
    cpu_seconds: int | None,
    memory: int | None,
    wall_seconds: float | None,
    output_bytes: int | None,
    disk_bytes: int | None,
    config_path: Path,
) -> None:
    """Create a batch of APP and print its id.

    One job per input; the batch id is printed alone on stdout.

    Unset options take their defaults from [jobs] in server.toml.
    """
    with open_store(config_path) as (config, store):
        d = config.jobs
        if quorum is None:
            quorum = d.quorum if replicas is None else replicas // 2 + 1
        source = _dir_inputs(inputs) if inputs.is_dir() else _jsonl_inputs(inputs)
        batch_id = store.create_batch(
            app_name,
            source,
            app_version=app_version,
            replicas=d.replicas if replicas is None else replicas,
            quorum=quorum,
            max_attempts=d.max_attempts if max_attempts is None else max_attempts,
            cpu_seconds=d.cpu_seconds if cpu_seconds is None else cpu_seconds,
            memory_bytes=d.memory_bytes if memory is None else memory,
            wall_seconds=d.wall_seconds if wall_seconds is None else wall_seconds,
            output_bytes=d.output_bytes if output_bytes is None else output_bytes,
            disk_bytes=d.disk_bytes if disk_bytes is None else disk_bytes,
            deadline=None if deadline is None else time.time() + deadline,
        )
        batch = store.get_batch(batch_id)
        warning = status_notes.replica_warning(batch.replicas, len(store.list_agents()))
    if warning is not None:
        click.echo(warning, err=True)
    click.echo(
        f"batch {batch_id}: {batch.n_jobs} jobs of {batch.app.name} v{batch.app.version}, "
        f"{batch.replicas} replica(s), quorum {batch.quorum}",
        err=True,
    )
    click.echo(str(batch_id))


@main.command()
@click.argument("batch_id", metavar="BATCH", type=int)
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
@click.option("--quiet", is_flag=True, help="No progress bar, only the summary.")
@click.option("--interval", type=click.FloatRange(0.05, 5.0), default=0.25, show_default=True)
@config_option
@click.pass_context
def wait(
    ctx: click.Context,
    batch_id: int,
    timeout: float | None,
    quiet: bool,
    interval: float,
    config_path: Path,
) -> None:
    """Show a progress bar until BATCH is finished.

    Exit codes: 0 every job done, 3 some job failed, 4 timed out.
    """
    started = time.monotonic()
    with open_store(config_path) as (_, store):
        st = store.batch_status(batch_id)
        with contextlib.ExitStack() as stack:
            bar = None
            if not quiet:
                bar = stack.enter_context(
                    click.progressbar(length=st.total, label=f"batch {batch_id}", file=sys.stderr)
                )
            shown = 0
            while True:
                finished = st.done + st.failed + st.cancelled
                if bar is not None and finished > shown:
                    bar.update(finished - shown)
                    shown = finished
                if st.finished:
                    break
                if timeout is not None and time.monotonic() - started >= timeout:
                    break
                time.sleep(interval)
                st = store.batch_status(batch_id)
    elapsed = time.monotonic() - started
    summary = f"batch {batch_id}: {st.done} done, {st.failed} failed of {st.total}"
    if st.cancelled:
        summary += f" ({st.cancelled} cancelled)"
    if not st.finished:
        click.echo(f"{summary}; timed out after {elapsed:.1f} s", err=True)
        ctx.exit(EXIT_TIMEOUT)
    click.echo(f"{summary} ({elapsed:.1f} s)")
    ctx.exit(EXIT_FAILED_JOBS if st.failed else 0)


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
