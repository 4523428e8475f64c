"""The sandbox driven by a non-root agent (uid 65534), where this machine allows it.

The agent's interpreter may live where uid 65534 cannot reach (pyenv under /root),
so the agent here is the system python3 with vcomp's source on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import EXAMPLES

SRC = Path(__file__).resolve().parents[3] / "src"

DRIVER = """
import asyncio, json, sys
from pathlib import Path
from vcomp.agent.sandbox import JobLimits, Sandbox

async def main():
    sandbox = Sandbox(work_root=Path(sys.argv[1]))
    limits = JobLimits(cpu_seconds=5, memory_bytes=512 << 20, wall_seconds=10,
                       output_bytes=1 << 20, max_processes=8)
    pi = await sandbox.run(kind="python", code=Path(sys.argv[2]).read_bytes(),
                           input=b'{"points": 10000, "seed": 1}', limits=limits)
    bomb = await sandbox.run(kind="python", code=Path(sys.argv[3]).read_bytes(),
                             input=b"", limits=limits)
    print(json.dumps({
        "pi": pi.kind.value, "pi_result": (pi.result or b"").decode(),
        "bomb": bomb.kind.value, "bomb_result": (bomb.result or b"").decode(),
        "protections": {p.name: p.status for p in pi.protections},
        "reasons": {p.name: p.reason for p in pi.protections},
    }))

asyncio.run(main())
"""

BOMB = """
import os, time
from vcomp.guest import run
def handler(data, progress):
    n = 0
    try:
        while n < 100:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
    except OSError:
        pass
    return str(n).encode()
run(handler)
"""


def system_python() -> str | None:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            out = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.stdout.strip() == "True":
                return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
def test_sandbox_as_uid_65534(tmp_path_factory: pytest.TempPathFactory) -> None:
    setpriv = shutil.which("setpriv")
    python = system_python()
    if setpriv is None or python is None:
        pytest.skip("needs setpriv and a system python >= 3.11 reachable by uid 65534")
    # pytest's own temp dirs are private to root; /var/tmp is open to every user.
    base = Path(tempfile.mkdtemp(prefix="vcomp-unpriv-", dir="/var/tmp"))
    try:
        _run_as_nobody(setpriv, python, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    _ = tmp_path_factory


def _run_as_nobody(setpriv: str, python: str, base: Path) -> None:
    for name, text in (("pi.py", (EXAMPLES / "pi.py").read_text()), ("bomb.py", BOMB)):
        (base / name).write_text(text)
    (base / "driver.py").write_text(DRIVER)
    # A copy of the sources: the checkout may sit in a directory only root can enter.
    shutil.copytree(
        SRC / "vcomp", base / "src" / "vcomp", ignore=shutil.ignore_patterns("__pycache__")
    )
    (base / "work").mkdir()
    for path in (base, base / "work", *base.iterdir()):
        os.chown(path, 65534, 65534)
    proc = subprocess.run(
        [
            setpriv,
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            python,
            str(base / "driver.py"),
            str(base / "work"),
            str(base / "pi.py"),
            str(base / "bomb.py"),
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base / "src"), "HOME": str(base)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Permission denied" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip("unprivileged user namespaces are disabled here")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pi"] == "ok" and json.loads(report["pi_result"])["points"] == 10000
    assert report["bomb"] == "ok" and int(report["bomb_result"]) < 8
    assert report["protections"]["unprivileged_uid"] == "active"
    assert report["protections"]["seccomp"] == "active"
    # Without a delegated cgroup the job is bounded per process, and says so.
    if report["protections"]["cgroup"] != "active":
        assert "only per process" in report["reasons"]["cgroup"], report["reasons"]
        assert report["protections"]["ipc_shm_limits"] in ("active", "unavailable"), report
    for name in ("minimal_root", "tmpfs_workdir", "no_ptmx", "private_proc"):
        assert report["protections"][name] == "active", name  # a user namespace can mount
    _ = sys
