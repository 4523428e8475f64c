"""``join``'s preference options: --max-memory reads sizes the way every other size
option does (vcomp.units.SIZE), with the same error messages."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from vcomp.agent.cli import main as agent_main
from vcomp.agent.preferences.options import override_preferences, preference_options
from vcomp.agent.preferences.settings import Preferences
from vcomp.errors import ConfigError
from vcomp.units import MAX_SIZE, parse_size


@click.command()
@preference_options
def show(**given: Any) -> None:
    """What join would run with: the defaults overridden by the options given."""
    click.echo(override_preferences(Preferences(), given).max_memory)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("536870912", 512 << 20),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("64 kb", 64 << 10),
        ("1T", 1 << 40),
        (str(MAX_SIZE), MAX_SIZE),
    ],
)
def test_max_memory_takes_every_size_form(text: str, expected: int) -> None:
    result = CliRunner().invoke(show, ["--max-memory", text])
    assert result.exit_code == 0, result.output
    assert int(result.output) == expected


@pytest.mark.parametrize("text", ["-1", "2X", "1.5G", "G", "", str(MAX_SIZE + 1), "99999999T"])
def test_join_refuses_a_bad_max_memory_with_the_shared_size_message(text: str) -> None:
    """The real `vcomp-agent join`: a usage error (exit 2) before anything starts."""
    with pytest.raises(ConfigError) as shared:
        parse_size(text)
    result = CliRunner().invoke(agent_main, ["join", "--max-memory", text])
    assert result.exit_code == 2, result.output
    assert "--max-memory" in result.output
    assert str(shared.value) in result.output
    assert "Traceback" not in result.output
