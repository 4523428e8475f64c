"""One unit vocabulary for sizes and durations, on every command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vcomp.agent.cli import main as agent_main
from vcomp.errors import ConfigError
from vcomp.units import parse_duration, parse_size


def test_sizes() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("4KiB") == 4096
    assert parse_size("1234") == 1234
    assert parse_size(" 1 T ") == 1 << 40


def test_durations() -> None:
    assert parse_duration("90s") == 90.0
    assert parse_duration("5m") == 300.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("300") == 300.0
    assert parse_duration("0.25") == 0.25


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5M", "1 megabyte", "9" * 40])
def test_bad_sizes_are_clear_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["", "soon", "-5s", "0", "5d", "nan", "inf", "1e400"])
def test_bad_durations_are_clear_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="not a duration"):
        parse_duration(text)


def test_sandbox_run_takes_the_same_units_as_submit(tmp_path: Path) -> None:
    program = tmp_path / "job.py"
    program.write_text("from vcomp.guest import run\nrun(lambda data: b'ok')\n")
    runner = CliRunner()
    for wall in ("--wall", "--wall-seconds"):  # the old spelling stays for scripts
        result = runner.invoke(
            agent_main,
            ["sandbox-run", str(program), "--memory", "256M", wall, "90s", "--idle", "1m"],
        )
        assert result.exit_code == 0, result.output
        assert result.stdout == "ok"
    bad = runner.invoke(agent_main, ["sandbox-run", str(program), "--memory", "lots"])
    assert bad.exit_code == 2 and "not a size" in bad.stderr
