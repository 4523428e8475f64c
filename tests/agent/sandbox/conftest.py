"""Fixtures for the sandbox tests: a real sandbox, a compiled pi.c, job helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vcomp.agent.sandbox import JobLimits, JobOutcome, Sandbox

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "server" / "examples"

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox is Linux only", allow_module_level=True)

LIMITS = JobLimits(cpu_seconds=10, memory_bytes=512 << 20, wall_seconds=20, output_bytes=1 << 20)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(work_root=tmp_path / "work")


@pytest.fixture(scope="session")
def pi_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; cannot build server/examples/pi.c")
    out = tmp_path_factory.mktemp("pi") / "pi"
    subprocess.run([gcc, "-O2", "-o", str(out), str(EXAMPLES / "pi.c")], check=True)
    return out.read_bytes()


def job(body: str) -> bytes:
    """A python job whose handler body is ``body`` (input in ``data``; returns bytes)."""
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return (
        "import os, sys, json, time, signal, socket, ctypes, subprocess\n"
        "from vcomp.guest import run\n"
        "def handler(data, progress):\n"
        f"{lines}\n"
        "run(handler)\n"
    ).encode()


async def run_python(
    sandbox: Sandbox, code: bytes, data: bytes = b"", limits: JobLimits = LIMITS
) -> JobOutcome:
    return await sandbox.run(kind="python", code=code, input=data, limits=limits)


async def assert_still_works(sandbox: Sandbox) -> None:
    """After any abuse, the same sandbox runs a normal job."""
    outcome = await run_python(sandbox, job("return data.upper()"), b"still fine")
    assert outcome.kind.value == "ok", outcome
    assert outcome.result == b"STILL FINE"


def processes_with(marker: str) -> list[int]:
    """Processes whose argv holds ``marker``, except python jobs of another interpreter
    (other test runs on the same host run theirs).
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                theirs = b"<vcomp-bootstrap>" in cmdline and not cmdline.startswith(
                    sys.executable.encode() + b"\0"
                )
                if marker.encode() in cmdline and not theirs:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture
def no_leftover_workdirs(sandbox: Sandbox) -> Iterator[None]:
    yield
    assert list(sandbox.work_root.iterdir()) == []


def in_child(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a forked child (so filters and limits stay there); return its
    JSON-able result, or raise if the child failed. The result goes through a file,
    since ``fn`` may close every descriptor.
    """
    fd, path = tempfile.mkstemp(prefix="vcomp-child-")
    try:
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    payload = json.dumps({"ok": fn()})
                except BaseException as exc:
                    payload = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                try:
                    os.write(fd, payload.encode())
                except OSError:  # fn closed every descriptor; Landlock may forbid reopening
                    with open(path, "w") as f:
                        f.write(payload)
            finally:
                os._exit(0)  # never return into pytest from the child
        os.waitpid(pid, 0)
        with open(path) as f:
            result = json.loads(f.read() or '{"error": "the child wrote nothing"}')
    finally:
        os.close(fd)
        os.unlink(path)
    if "error" in result:
        raise AssertionError(result["error"])
    return result["ok"]


@pytest.fixture(autouse=True)
def _close_sandboxes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Stop every prepared launcher a test leaves behind."""
    made: list[Sandbox] = []
    original = Sandbox.__init__

    def init(self: Sandbox, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Sandbox, "__init__", init)
    yield
    for sandbox in made:
        sandbox.close()
