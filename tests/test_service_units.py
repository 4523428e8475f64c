"""The systemd units in agent/ and server/: ``systemd-analyze verify`` accepts them
without a warning, and they keep the hardening each side needs (and nothing that would
break the agent's sandbox)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AGENT_UNIT = REPO / "agent" / "vcomp-agent.service"
SERVER_UNIT = REPO / "server" / "vcomp-server.service"
BIN = Path(sys.executable).parent


def settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize(
    ("unit", "command"), [(AGENT_UNIT, "vcomp-agent"), (SERVER_UNIT, "vcomp-server")]
)
def test_unit_verifies(unit: Path, command: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian package systemd); cannot verify units"
        )
    # verify checks that ExecStart's binary exists: point it at this checkout's install.
    text = unit.read_text().replace(f"/usr/local/bin/{command}", str(BIN / command))
    assert str(BIN / command) in text
    copy = tmp_path / unit.name
    copy.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # Unknown keys and bad values are only warnings to verify: none may name this unit.
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert complaints == []


def test_agent_unit_is_gentle_and_leaves_the_sandbox_its_namespaces() -> None:
    s = settings(AGENT_UNIT)
    assert s["Nice"] == ["19"]
    assert s["IOSchedulingClass"] == ["idle"]
    # The sandbox makes user, mount, pid, net, ipc and uts namespaces and per-job cgroups.
    breakers = (
        "PrivateUsers",
        "RestrictNamespaces",
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "ProtectHostname",
    )
    for breaks_the_sandbox in breakers:
        assert breaks_the_sandbox not in s, breaks_the_sandbox
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["ExecStart"] == ["/usr/local/bin/vcomp-agent join --config /var/lib/vcomp-agent"]


def test_server_unit_is_locked_down() -> None:
    s = settings(SERVER_UNIT)
    for key, value in (
        ("User", "vcomp-server"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictNamespaces", "yes"),
        ("CapabilityBoundingSet", ""),
    ):
        assert s[key] == [value], key
    assert s["ExecStart"] == ["/usr/local/bin/vcomp-server serve --config /var/lib/vcomp-server"]
