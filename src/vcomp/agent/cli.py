"""``vcomp-agent``: the volunteer's command line.

Commands that use the agent's home find it through ``--config`` (the directory or its
agent.toml), else ``$VCOMP_AGENT_HOME``, else ``~/.vcomp-agent``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click

from vcomp import __version__
from vcomp.agent.config import (
    CONFIG_FILE,
    AgentConfig,
    default_agent_home,
    init_agent_home,
    load_agent_config,
    normalise_servers,
    resolve_server_key,
)
from vcomp.agent.modes import MODE_KINDS
from vcomp.agent.preferences.options import override_preferences, preference_options
from vcomp.cligroup import VcompGroup
from vcomp.units import DURATION, SIZE

_F = TypeVar("_F", bound=Callable[..., Any])


def config_option(f: _F) -> _F:
    option = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        default=None,
        help="Agent home directory or its agent.toml "
        "[default: $VCOMP_AGENT_HOME, else ~/.vcomp-agent].",
    )
    return option(f)


def load_config(config_path: Path | None) -> AgentConfig:
    return load_agent_config(default_agent_home() if config_path is None else config_path)


@click.group(cls=VcompGroup)
@click.version_option(__version__, prog_name="vcomp-agent")
def main() -> None:
    """Run a vcomp volunteer agent on this machine.

    Start with `vcomp-agent init DIR`, hand the printed lines to the organisation,
    then run `vcomp-agent join --config DIR`.
    """


# ---------------------------------------------------------------------- home


def _print_identity(config: AgentConfig) -> None:
    from vcomp.agent.enrolment import format_enrolment
    from vcomp.agent.measure import golden_measurement

    tpm = config.open_tpm()
    try:
        click.echo(f"agent home: {config.home}")
        click.echo(f"tpm:        {config.tpm}")
        click.echo(f"agent id:   {tpm.agent_id.hex()}")
        click.echo("enrolment line (the organisation runs: vcomp-server enroll LINE):")
        click.echo(format_enrolment(tpm, config.name))
    finally:
        tpm.close()
    click.echo("golden measurement (vcomp-server allow-measurement TEXT):")
    click.echo(golden_measurement(config.policy(), pcrs=config.measured_pcrs()).format())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Name shown to the organisation [default: this host's name].")
@click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="HOST:PORT",
    help="An organisation server; repeat for several (tried in turn if one goes away).",
)
@click.option(
    "--server-key",
    default="",
    metavar="FINGERPRINT|FILE",
    help="The server key to pin: its fingerprint (64 hex digits; what vcomp-server init "
    "prints and server.pub holds) or the path of server.pub.",
)
@click.option("--force", is_flag=True, help="Rewrite agent.toml in a non-empty DIR; keeps the TPM.")
@click.option(
    "--tpm",
    default="simulated",
    show_default=True,
    metavar="simulated|swtpm:HOST:PORT|device[:PATH]",
    help="Where the attestation key lives: the simulated TPM, a swtpm (control port "
    "PORT+1) or a TPM device [default device: /dev/tpmrm0]. Real TPMs need the tpm extra.",
)
def init(
    directory: Path,
    name: str | None,
    servers: tuple[str, ...],
    server_key: str,
    force: bool,
    tpm: str,
) -> None:
    """Create an agent home in DIRECTORY.

    Writes agent.toml, the simulated TPM (the agent's identity), spool/ and work/, and
    prints the enrolment line and the golden measurement to hand to the organisation.
    """
    config = init_agent_home(
        directory, name=name, servers=servers, server_key=server_key, force=force, tpm=tpm
    )
    _print_identity(config)
    if not (config.servers and config.server_key):
        click.echo(
            f"Before joining, set servers and server_key in {config.config_path} "
            "or pass --server and --server-key to join.",
            err=True,
        )


@main.command()
@config_option
@click.option(
    "--line",
    "line_only",
    is_flag=True,
    help="Only the enrolment line (the default when stdout is not a terminal).",
)
def enrolment(config_path: Path | None, line_only: bool) -> None:
    """Print this agent's enrolment line again.

    On a terminal it also prints the agent id and the golden measurement, as init did.
    Piped or with --line, only the line:
    vcomp-server enroll "$(vcomp-agent enrolment)".
    """
    config = load_config(config_path)
    if line_only or not sys.stdout.isatty():
        from vcomp.agent.enrolment import format_enrolment

        tpm = config.open_tpm()
        try:
            click.echo(format_enrolment(tpm, config.name))
        finally:
            tpm.close()
        return
    _print_identity(config)


@main.command()
@config_option
def measure(config_path: Path | None) -> None:
    """Print this install's golden measurement.

    Simulated TPM: PCR 17 measures the agent's code, PCR 18 its sandbox policy. A real
    TPM: PCR 23 measures both, in that order.
    """
    from vcomp.agent.measure import golden_measurement

    config = load_config(config_path)
    click.echo(golden_measurement(config.policy(), pcrs=config.measured_pcrs()).format())


@main.command()
@config_option
@click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="HOST:PORT",
    help="Override servers in agent.toml; repeat for several.",
)
@click.option("--server-key", metavar="FINGERPRINT|FILE", help="Override server_key.")
@click.option("--mode", type=click.Choice(MODE_KINDS), help="Override mode.")
@click.option(
    "--cpu-percent",
    type=click.IntRange(1, 99),
    help="For --mode throttle (required there): the share of one core a job may use.",
)
@click.option("--core", type=click.IntRange(min=0), help="For --mode dedicated.")
@click.option("--cores", type=click.IntRange(1, 1024), help="Concurrent jobs.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append the log here instead of stderr; reopened when logrotate moves it.",
)
@preference_options
def join(
    config_path: Path | None,
    servers: tuple[str, ...],
    server_key: str | None,
    mode: str | None,
    cpu_percent: int | None,
    core: int | None,
    cores: int | None,
    log_file: Path | None,
    **preferences: Any,
) -> None:
    """Run jobs for the organisation until SIGINT or SIGTERM.

    Refuses to start without a server and a pinned server key, and refuses any
    session in which the server cannot prove that key.
    """
    config = load_config(config_path)
    changes: dict[str, Any] = {}
    if servers:
        changes["servers"] = normalise_servers(servers)
    if server_key is not None:
        changes["server_key"] = resolve_server_key(server_key)
    for key, value in (("mode", mode), ("cpu_percent", cpu_percent), ("core", core)):
        if value is not None:
            changes[key] = value
    if cores is not None:
        changes["cores"] = cores
    effective_mode = mode or config.mode
    if cpu_percent is not None and effective_mode != "throttle":
        raise click.UsageError("--cpu-percent applies to --mode throttle")
    if core is not None and effective_mode != "dedicated":
        raise click.UsageError("--core applies to --mode dedicated")
    config = dataclasses.replace(
        config, preferences=override_preferences(config.preferences, preferences), **changes
    )
    config.server_addresses()  # both raise a ConfigError saying what is missing
    config.server_fingerprint()

    from vcomp.agent.runtime import join as run_agent

    run_agent(config, log_file)


# ---------------------------------------------------------------------- live status


def _ask(config_path: Path | None, command: str) -> dict[str, Any]:
    from vcomp.agent.status import request
    from vcomp.errors import AgentUnreachable

    try:
        return request(load_config(config_path).status_socket, command)
    except AgentUnreachable as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Show what the running agent is doing now.

    The server and session of each worker, the current job with its progress and CPU,
    the mode, why the agent is paused if it is, jobs done today and in total, and the
    CPU-seconds donated. Asks the agent through status.sock in its home.
    """
    from vcomp.agent.status import format_status

    doc = _ask(config_path, "status")
    doc.pop("ok", None)
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else format_status(doc))


@main.command()
@config_option
def pause(config_path: Path | None) -> None:
    """Stop the running agent's jobs until `vcomp-agent resume` (no work is lost).

    Running jobs are stopped where they are (frozen, or SIGSTOP) and continue on resume;
    the agent keeps its sessions and leases meanwhile.
    """
    _ask(config_path, "pause")
    click.echo("paused: jobs are stopped until `vcomp-agent resume`")


@main.command()
@config_option
def resume(config_path: Path | None) -> None:
    """Let the running agent's jobs continue after `vcomp-agent pause`.

    Other rules (schedule, battery, user activity) may still hold them; `status` says.
    """
    doc = _ask(config_path, "resume")
    reasons = dict(doc.get("paused_because") or {})
    if reasons:
        click.echo("resumed; still held by: " + "; ".join(reasons.values()))
    else:
        click.echo("resumed")


# ---------------------------------------------------------------------- tools


@main.command()
@click.option(
    "--qualifying-data", "qualifying_hex", required=True, help="Nonce for extraData, hex."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Simulated TPM state directory [default: the agent home's TPM].",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.File("rb"),
    help="Sandbox policy, JSON [default: the agent home's policy, else {}].",
)
@config_option
def quote(
    qualifying_hex: str,
    out_dir: Path,
    state_dir: Path | None,
    policy_file: BinaryIO | None,
    config_path: Path | None,
) -> None:
    """Write a quote for tpm2_checkquote into OUT.

    Does the measured launch first.

    Uses the agent home's TPM and policy when the home has an agent.toml (always with
    --config); --state and --policy override them.
    """
    from vcomp.agent.measure import measured_launch
    from vcomp.agent.tpm import SimulatedTpm, default_state_dir, write_quote_files
    from vcomp.agent.tpm_backend import Tpm

    try:
        qualifying_data = bytes.fromhex(qualifying_hex)
        policy_override = json.load(policy_file) if policy_file else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    home = default_agent_home() if config_path is None else config_path
    config = None
    if config_path is not None or (home / CONFIG_FILE).is_file():
        config = load_agent_config(home)
    if policy_override is not None:
        policy = policy_override
    else:
        policy = config.policy() if config is not None else {}
    if state_dir is not None or config is None:
        tpm: Tpm = SimulatedTpm.open(state_dir or default_state_dir())
    else:
        tpm = config.open_tpm()
    try:
        measured_launch(tpm, policy)
        write_quote_files(tpm, qualifying_data, out_dir)
    finally:
        tpm.close()
    pcr_list = ",".join(str(i) for i in tpm.measured_pcrs)
    click.echo(f"quote written to {out_dir}; pcr list sha256:{pcr_list}")


@main.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Show every sandbox protection as active, unavailable or failed, with the reason.

    Then the volunteer's preferences from agent.toml (if there is one), with where user
    activity and the battery are read from, and the TPM backend (a hardware root of
    trust or the simulation). Exits 1 if the sandbox cannot give at least the rlimit,
    cleared-environment, process-tree-kill and unprivileged-uid guarantees.
    """

    from vcomp.agent.sandbox.commands import doctor as run_doctor
    from vcomp.agent.tpm_backend import tpm_report

    home = default_agent_home() if config_path is None else config_path
    config = None
    if config_path is not None or (home / CONFIG_FILE).is_file():
        config = load_agent_config(home)
    code = run_doctor(sys.stdout, preferences=None if config is None else config.preferences)
    if config is not None:
        status, reason = tpm_report(config.tpm_spec(), config.tpm_dir)
        click.echo(f"\ntpm      {status:<11}  {reason}")
    raise SystemExit(code)


@main.command(
    "sandbox-run",
    epilog="Exit codes: 0 ok, 10 nonzero_exit, 11 signaled, 12 cpu_limit, 13 memory_limit, "
    "14 wall_timeout, 15 idle_timeout, 16 output_too_large, 17 protocol_violation, "
    "18 setup_failed, 19 cancelled.",
)
@click.argument("program", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(["python", "exec"]), default="python", show_default=True)
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path))
@click.option("--cpu-seconds", type=click.IntRange(min=1), default=60, show_default=True)
@click.option(
    "--memory", type=SIZE, default="1G", show_default=True, help="Bytes, or 512M, 2G (x1024)."
)
@click.option(
    "--wall",
    "--wall-seconds",
    "wall",
    type=DURATION,
    default="300",
    show_default=True,
    help="Seconds, or 90s, 5m, 1h.",
)
@click.option("--idle", type=DURATION, default=None, help="Seconds, or 90s, 5m, 1h.")
@click.option(
    "--mode",
    type=click.Choice(["full", "throttle", "dedicated", "background"]),
    default="full",
    show_default=True,
)
@click.option("--cpu-percent", type=int, default=None, help="For --mode throttle.")
@click.option("--core", type=int, default=None, help="For --mode dedicated.")
def sandbox_run(
    program: Path,
    kind: str,
    input_path: Path | None,
    cpu_seconds: int,
    memory: int,
    wall: float,
    idle: float | None,
    mode: str,
    cpu_percent: int | None,
    core: int | None,
) -> None:
    """Run PROGRAM once in the sandbox, exactly as a real job is run.

    The result bytes go to stdout and the outcome to stderr as one JSON line.
    """
    from vcomp.agent.modes import parse_mode
    from vcomp.agent.sandbox.commands import sandbox_run as run_job

    execution_mode = parse_mode(mode, cpu_percent=cpu_percent, core=core)
    code = run_job(
        program,
        kind="exec" if kind == "exec" else "python",
        input_path=input_path,
        cpu_seconds=cpu_seconds,
        memory_bytes=memory,
        wall_seconds=wall,
        idle_seconds=idle,
        mode=execution_mode,
    )
    raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
