"""JobTree on a real process tree: discovery, suspend/resume, CPU time, kill."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from vcomp.agent.sandbox.tree import JobTree

# A root with two busy children and one sleeping grandchild.
TREE = """
import os, time
for busy in (True, True, False):
    if os.fork() == 0:
        if not busy and os.fork() == 0:
            time.sleep(60)
        while busy:
            pass
        time.sleep(60)
time.sleep(60)
"""


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Signals are delivered asynchronously; poll instead of asserting at once."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def state(pid: int) -> str:
    """The process's state letter; "X" (dead) once it is gone, as it may be between
    listing the tree and reading its stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return "X"


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], JobTree]]:
    # A stand-in launcher: a shell whose only child is the job root.
    proc = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c '{TREE}'; :"])
    t = JobTree(proc.pid)
    deadline = time.monotonic() + 10
    while len(t.pids()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield proc, t
    t.kill()
    proc.kill()
    proc.wait()


def test_pids_finds_every_descendant(tree: tuple[subprocess.Popen[bytes], JobTree]) -> None:
    proc, t = tree
    pids = t.pids()
    assert len(pids) == 5  # python root, 3 children, 1 grandchild
    assert proc.pid not in pids


def test_suspend_and_resume(tree: tuple[subprocess.Popen[bytes], JobTree]) -> None:
    _, t = tree
    t.suspend()
    assert eventually(lambda: {state(p) for p in t.pids()} == {"T"})
    t.resume()
    assert eventually(lambda: "T" not in {state(p) for p in t.pids()})


def test_cpu_seconds_grows_and_never_drops(tree: tuple[subprocess.Popen[bytes], JobTree]) -> None:
    _, t = tree
    first = t.cpu_seconds()
    time.sleep(0.3)
    second = t.cpu_seconds()
    assert second > first
    t.sample_memory()
    assert t.peak_rss_bytes > 0 and t.peak_vm_bytes >= t.peak_rss_bytes
    t.kill()
    time.sleep(0.05)
    assert t.cpu_seconds() >= second


def test_kill_leaves_nothing(tree: tuple[subprocess.Popen[bytes], JobTree]) -> None:
    _, t = tree
    t.kill()
    deadline = time.monotonic() + 5
    while [p for p in t.pids() if state(p) not in ("Z", "X")] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in t.pids() if state(p) not in ("Z", "X")] == []
