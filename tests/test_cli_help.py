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
