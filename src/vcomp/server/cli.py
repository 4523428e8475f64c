"""``vcomp-server``: the organisation's command line.

Every command but ``init`` works on a server home (``--config``, else
``$VCOMP_SERVER_HOME``, else the current directory). Store commands talk to the SQLite
job store directly (the store named by ``[store] url`` or ``$VCOMP_STORE_URL``), so they
work whether or not ``serve`` is running: the server picks up new batches, allowlist
entries and reset requests from the store. Every command but ``init`` and ``migrate``
refuses a store whose schema is not this vcomp's, naming ``migrate``.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click

from vcomp import __version__
from vcomp.cligroup import VcompGroup
from vcomp.errors import ConfigError
from vcomp.server import status_notes
from vcomp.server.config import (
    CONFIG_FILE,
    KEY_FILE,
    PUBLIC_FILE,
    ServerConfig,
    init_server_home,
    load_server_config,
)
from vcomp.server.hooks import load as load_hook
from vcomp.server.store import (
    RESULT_OK,
    AgentRecord,
    JobState,
    ResultRecord,
    Store,
    StoreStatus,
)
from vcomp.server.store import open_store as open_store_url
from vcomp.server.store.checks import MAX_BLOB_BYTES
from vcomp.server.store.url import migrate_store, redact_store_url
from vcomp.units import DURATION, SIZE

EXIT_FAILED_JOBS = 3
EXIT_TIMEOUT = 4
MAX_ENROL_FILE = 1 << 20
OUTPUT_CHUNK = 3 << 18  # a multiple of 3, so base64 chunks concatenate cleanly
_F = TypeVar("_F", bound=Callable[..., Any])


def config_option(f: _F) -> _F:
    option = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        envvar="VCOMP_SERVER_HOME",
        default=".",
        help="Server home directory or its server.toml "
        "[default: $VCOMP_SERVER_HOME, else the current directory].",
    )
    return option(f)


@contextlib.contextmanager
def open_store(config_path: Path) -> Iterator[tuple[ServerConfig, Store]]:
    config = load_server_config(config_path)
    store = open_store_url(config.store_url)
    try:
        yield config, store
    finally:
        store.close()


@click.group(cls=VcompGroup)
@click.version_option(__version__, prog_name="vcomp-server")
def main() -> None:
    """Run a vcomp organisation server and manage its jobs.

    Start with `vcomp-server init DIR`, then run the other commands with
    --config DIR (or from DIR, or with VCOMP_SERVER_HOME=DIR).
    """


# ---------------------------------------------------------------------- home and server


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
    from vcomp.server.config import load_signing_key, parse_host_port
    from vcomp.server.service import serve as run_server

    config = load_server_config(config_path)
    if bind is not None:
        host, port = parse_host_port(bind, what="--bind", allow_zero=True)
        config = dataclasses.replace(config, bind_host=host, bind_port=port)
    if http_bind is not None:
        http = dataclasses.replace(config.http, bind=http_bind)  # checked again here
        config = dataclasses.replace(config, http=http)
    load_signing_key(config.key_path)  # fail here, readably, on a bad or exposed key
    run_server(config, log_file=log_file)


# ---------------------------------------------------------------------- agents and allowlist


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


# ---------------------------------------------------------------------- apps


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


# ---------------------------------------------------------------------- batches


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


# ---------------------------------------------------------------------- results


def _output_is_utf8(read: Callable[[int, int], bytes], size: int) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for offset in range(0, size, OUTPUT_CHUNK):
            decoder.decode(read(offset, OUTPUT_CHUNK))
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def write_result_line(out: BinaryIO, store: Store, rec: ResultRecord) -> None:
    """One JSON line per job; the output is streamed in chunks, never loaded whole."""
    r = rec.result
    head: dict[str, Any] = {
        "index": rec.index,
        "job_id": rec.job_id,
        "state": rec.state.value,
        "reason": rec.reason,
        "status": r.status if r else None,
        # A success has no error (real agents describe one as "ok", its outcome kind).
        "error": (r.error or None) if r and r.status != RESULT_OK else None,
        "agent_id": r.agent_id if r else None,
        "attempt": r.attempt if r else None,
        "output_size": r.output_size if r else None,
        "output_sha256": r.output_sha256.hex() if r else None,
        "cpu_ms": r.cpu_ms if r else None,
        "wall_ms": r.wall_ms if r else None,
    }
    text = json.dumps(head)
    if r is None:
        out.write(text.encode() + b"\n")
        return
    out.write(text[:-1].encode() + b', "output_b64": "')
    with store.open_output(r.job_id, r.attempt) as blob:
        size = blob.size
        for offset in range(0, size, OUTPUT_CHUNK):
            out.write(base64.b64encode(blob.read(offset, OUTPUT_CHUNK)))
        out.write(b'"')
        if _output_is_utf8(blob.read, size):
            out.write(b', "output": "')
            decoder = codecs.getincrementaldecoder("utf-8")()
            for offset in range(0, size, OUTPUT_CHUNK):
                part = decoder.decode(blob.read(offset, OUTPUT_CHUNK), final=False)
                out.write(json.dumps(part)[1:-1].encode())
            out.write(json.dumps(decoder.decode(b"", final=True))[1:-1].encode() + b'"')
    out.write(b"}\n")


@main.command()
@click.argument("batch_id", metavar="BATCH", type=int)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path))
@config_option
def results(batch_id: int, out_path: Path | None, config_path: Path) -> None:
    """Write BATCH's results as JSON Lines.

    One line per job, to stdout or --out FILE.

    Fields: index, job_id, state, reason, status, error, agent_id, attempt, output_size,
    output_sha256, cpu_ms, wall_ms, output_b64 (the output in base64) and, when the
    output is valid UTF-8, output (as text).
    """
    with open_store(config_path) as (_, store), contextlib.ExitStack() as stack:
        store.get_batch(batch_id)
        out = sys.stdout.buffer if out_path is None else stack.enter_context(out_path.open("wb"))
        count = 0
        for rec in store.iter_results(batch_id):
            write_result_line(out, store, rec)
            count += 1
        out.flush()
    if out_path is not None:
        click.echo(f"wrote {count} results to {out_path}", err=True)


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


from vcomp.server import cli_agents, cli_batches, cli_tokens  # noqa: E402,F401  register them

if __name__ == "__main__":  # pragma: no cover
    main()
