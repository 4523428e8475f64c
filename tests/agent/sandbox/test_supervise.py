"""Supervision on the agent's shared event loop: one job's end never stalls another's.

Two workers (two sandboxes) share the loop, as in the agent. Worker A's launcher is
held stopped while A is torn down, so reaping it has to wait. A has no job cgroup:
the cgroup's kill would take the launcher along at once. Without one (no delegation,
an unprivileged agent) the launcher outlives the job until the job's namespaces are
torn down, which takes long for a job that filled its memory or its tmpfs work dir;
the stop stands in for that, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vcomp.agent.sandbox import JobOutcome, OutcomeKind, Sandbox
from vcomp.agent.sandbox.supervise import KILL_GRACE

from .conftest import LIMITS, job

STREAMING = job("""
for i in range(1, 1_000_000):
    progress(i / 1_000_000)
    time.sleep(0.01)
return b"never"
""")
EVENTS_DURING_TEARDOWN = 5  # of the other job, at most ~10 a second (pipes.PROGRESS_PAUSE)


def _children() -> set[int]:
    me = os.getpid()
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{me}/task"):
        with contextlib.suppress(OSError):
            found.update(
                int(p) for p in Path(f"/proc/{me}/task/{tid}/children").read_text().split()
            )
    return found


def _exists(pid: int) -> bool:
    """Is ``pid`` still there, even as an unreaped zombie?"""
    return os.path.exists(f"/proc/{pid}")


async def _until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@dataclass
class TwoWorkers:
    """Worker A's job (its launcher stopped) and worker B's, both streaming progress."""

    task_a: asyncio.Task[JobOutcome]
    cancel_a: asyncio.Event
    launcher_a: int
    task_b: asyncio.Task[JobOutcome]
    b_events: list[float] = field(default_factory=list)


def _start(
    sandbox: Sandbox, on_progress: Callable[[float], None], cancel: asyncio.Event
) -> asyncio.Task[JobOutcome]:
    return asyncio.create_task(
        sandbox.run(
            kind="python",
            code=STREAMING,
            input=b"",
            limits=LIMITS,
            on_progress=on_progress,
            cancel=cancel,
        )
    )


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[TwoWorkers]:
    worker_a = Sandbox(work_root=tmp_path / "a", prespawn=False, use_cgroup=False)
    worker_b = Sandbox(work_root=tmp_path / "b", prespawn=False)
    a_started, cancel_a, cancel_b = asyncio.Event(), asyncio.Event(), asyncio.Event()
    before = _children()
    task_a = _start(worker_a, lambda _f: a_started.set(), cancel_a)
    await asyncio.wait_for(a_started.wait(), 60)
    (launcher_a,) = _children() - before  # prespawn=False: A's launcher is the only new one
    b_events: list[float] = []
    task_b = _start(worker_b, b_events.append, cancel_b)
    workers = TwoWorkers(task_a, cancel_a, launcher_a, task_b, b_events)
    try:
        await _until(lambda: len(b_events) >= 2, "worker B streams progress")
        os.kill(launcher_a, signal.SIGSTOP)
        cancel_a.set()  # A's tree dies; its launcher, stopped, cannot be reaped yet
        yield workers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(launcher_a, signal.SIGCONT)
        cancel_b.set()
        for task in (task_a, task_b):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert task_b.result().kind is OutcomeKind.CANCELLED, task_b.result()
    assert not _exists(launcher_a), "A's launcher was left unreaped"


async def test_one_jobs_teardown_does_not_stall_another_workers_traffic(
    two_workers: TwoWorkers,
) -> None:
    """B's progress keeps arriving while A's reap waits, and the test itself releases
    A's launcher once it has seen that. A blocking wait would keep the loop (and B,
    and the release) stuck until KILL_GRACE ran out and A's launcher was killed."""
    w = two_workers
    seen_at_stop = len(w.b_events)
    while not w.task_a.done() and len(w.b_events) < seen_at_stop + EVENTS_DURING_TEARDOWN:
        await asyncio.sleep(0.01)
    b_during = len(w.b_events) - seen_at_stop
    released_by_test = not w.task_a.done()
    if released_by_test:
        os.kill(w.launcher_a, signal.SIGCONT)
    outcome_a = await w.task_a
    assert released_by_test, (
        f"A's teardown blocked the loop: B's progress arrived {b_during} times while A's "
        f"launcher was held, and A ended only when KILL_GRACE ({KILL_GRACE}s) ran out"
    )
    assert outcome_a.kind is OutcomeKind.CANCELLED, outcome_a
    assert not _exists(w.launcher_a)


async def test_a_launcher_that_never_exits_is_killed_and_reaped(two_workers: TwoWorkers) -> None:
    """Held stopped for good: after KILL_GRACE the supervisor kills and reaps it, and B
    kept streaming all along (every tenth of a second or so, so dozens of events)."""
    w = two_workers
    seen_at_stop = len(w.b_events)
    outcome_a = await w.task_a
    assert outcome_a.kind is OutcomeKind.CANCELLED, outcome_a
    assert not _exists(w.launcher_a)
    assert len(w.b_events) - seen_at_stop >= EVENTS_DURING_TEARDOWN


async def test_cancelling_the_worker_during_the_reap_leaves_no_process(
    two_workers: TwoWorkers,
) -> None:
    w = two_workers
    seen_at_stop = len(w.b_events)
    await _until(lambda: len(w.b_events) >= seen_at_stop + 2, "B streams during A's reap")
    assert not w.task_a.done()
    w.task_a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w.task_a
    assert not _exists(w.launcher_a)
