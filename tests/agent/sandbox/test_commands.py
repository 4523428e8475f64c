"""`vcomp-agent doctor` and `vcomp-agent sandbox-run`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vcomp.agent.sandbox.commands import doctor, minimum_missing, sandbox_run
from vcomp.agent.sandbox.outcome import EXIT_CODES, OutcomeKind, Protection
from vcomp.udp_offload import OFFLOAD_ENV, probe_gso

from .conftest import EXAMPLES


def test_doctor_lists_protections_and_passes_here() -> None:
    out = io.StringIO()
    assert doctor(out) == 0
    text = out.getvalue()
    for name in ("rlimits", "seccomp", "landlock", "pid_namespace", "unprivileged_uid"):
        assert name in text
    assert "minimum guarantees present" in text
    cgroup = next(line.split(None, 2) for line in text.splitlines() if line.startswith("cgroup "))
    assert cgroup[1] in ("active", "unavailable", "failed"), cgroup
    if cgroup[1] == "active":
        assert cgroup[2].startswith(("v1: memory", "v2: memory")), cgroup
    else:
        assert "only per process" in cgroup[2], cgroup


def test_doctor_reports_udp_offload_as_probed_and_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        gso_here = probe_gso(s).active
    out = io.StringIO()
    doctor(out)
    rows = {
        ln[:7]: ln.split(None, 3) for ln in out.getvalue().splitlines() if ln.startswith("udp ")
    }
    assert set(rows) == {"udp gso", "udp gro"}
    assert rows["udp gso"][2] == ("active" if gso_here else "unavailable"), rows
    assert all(len(r) == 4 and r[3] for r in rows.values()), rows  # each says why
    monkeypatch.setenv(OFFLOAD_ENV, "off")
    out = io.StringIO()
    doctor(out)
    off = [ln.split(None, 3) for ln in out.getvalue().splitlines() if ln.startswith("udp ")]
    assert [r[2] for r in off] == ["off", "off"] and all(OFFLOAD_ENV in r[3] for r in off)


def test_minimum_missing() -> None:
    prots = [Protection("rlimits", "active"), Protection("unprivileged_uid", "failed", "x")]
    assert minimum_missing(prots) == [
        "cleared_environment",
        "process_tree_kill",
        "unprivileged_uid",
    ]


def test_sandbox_run_writes_result_and_one_json_line(tmp_path: Path) -> None:
    data = tmp_path / "in.json"
    data.write_text('{"points": 1000, "seed": 1}')
    out, err = io.BytesIO(), io.StringIO()
    code = sandbox_run(EXAMPLES / "pi.py", kind="python", input_path=data, stdout=out, stderr=err)
    assert code == 0
    assert json.loads(out.getvalue())["points"] == 1000
    (line,) = err.getvalue().splitlines()
    summary = json.loads(line)
    assert summary["kind"] == "ok" and summary["protections"]["rlimits"] == "active"


def test_sandbox_run_exit_code_per_outcome(tmp_path: Path) -> None:
    program = tmp_path / "sleepy.py"
    program.write_text("import time\ntime.sleep(30)\n")
    code = sandbox_run(
        program,
        kind="python",
        input_path=None,
        wall_seconds=0.5,
        stdout=io.BytesIO(),
        stderr=io.StringIO(),
    )
    assert code == EXIT_CODES[OutcomeKind.WALL_TIMEOUT]


def test_cli_commands_exist() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", "from vcomp.agent.cli import main; main()", "sandbox-run", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "14 wall_timeout" in proc.stdout
