"""Both console scripts answer --help."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["vcomp.server.cli", "vcomp.agent.cli"])
def test_help_exits_zero(module: str) -> None:
    code = f"import sys; from {module} import main; sys.argv[0] = 'x'; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_every_server_command_is_registered() -> None:
    """The commands live in vcomp.server.cli_* modules; each must be on the group."""
    from vcomp.server.cli import main

    assert sorted(main.commands) == [
        "agent",
        "agents",
        "allow-measurement",
        "app",
        "batch",
        "enroll",
        "init",
        "migrate",
        "reset",
        "results",
        "serve",
        "status",
        "submit",
        "token",
        "wait",
    ]
