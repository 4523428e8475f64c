"""``vcomp-agent``: the volunteer's command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import click

from vcomp import __version__
from vcomp.errors import VcompError


@click.group()
@click.version_option(__version__, prog_name="vcomp-agent")
def main() -> None:
    """Run a vcomp volunteer agent on this machine."""


@main.command()
@click.option(
    "--qualifying-data", "qualifying_hex", required=True, help="Nonce for extraData, hex."
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Simulated TPM state directory [default: $VCOMP_AGENT_HOME/tpm].",
)
@click.option("--policy", "policy_file", type=click.File("rb"), help="Sandbox policy, JSON.")
def quote(
    qualifying_hex: str, out_dir: Path, state_dir: Path | None, policy_file: BinaryIO | None
) -> None:
    """Measured launch, then write a quote for tpm2_checkquote into OUT."""
    from vcomp.agent.measure import measured_launch
    from vcomp.agent.tpm import SimulatedTpm, default_state_dir, write_quote_files

    try:
        qualifying_data = bytes.fromhex(qualifying_hex)
        policy = json.load(policy_file) if policy_file else {}
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        tpm = SimulatedTpm.open(state_dir or default_state_dir())
        measured_launch(tpm, policy)
        write_quote_files(tpm, qualifying_data, out_dir)
    except VcompError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"quote written to {out_dir}; pcr list sha256:17,18")


@main.command()
def doctor() -> None:
    """Show every sandbox protection as active, unavailable or failed, with the reason.

    Exits 1 if the sandbox cannot give at least the rlimit, cleared-environment,
    process-tree-kill and unprivileged-uid guarantees.
    """
    import sys

    from vcomp.agent.sandbox.commands import doctor as run_doctor

    raise SystemExit(run_doctor(sys.stdout))


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
@click.option("--memory", type=click.IntRange(min=1), default=1 << 30, show_default=True)
@click.option("--wall", type=click.FloatRange(min=0.001), default=300.0, show_default=True)
@click.option("--idle", type=click.FloatRange(min=0.001), default=None)
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

    try:
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
    except VcompError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(code)
