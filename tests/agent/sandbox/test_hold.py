"""The volunteer's hold: a real job stands still (no CPU) while held, its held time is not
charged to its wall clock, and it finishes with the right result once released."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from vcomp.agent.modes import ExecutionMode
from vcomp.agent.sandbox import OutcomeKind, Sandbox
from vcomp.agent.sandbox.hold import HeldTree, Hold, JobControl

from .conftest import LIMITS, job

# About half a CPU-second of work with a result that shows it all ran.
WORK = job("""
n, total = 0, 0
end = time.process_time() + 0.5
while time.process_time() < end:
    n += 1
    total += n * n
return json.dumps({"ok": total == n * (n + 1) * (2 * n + 1) // 6, "n": n}).encode()
""")


async def wait_for(predicate, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_held_job_uses_no_cpu_and_finishes_after_release(tmp_path: Path) -> None:
    sandbox = Sandbox(work_root=tmp_path / "w", mode=ExecutionMode(kind="full"))
    hold = Hold()
    control = JobControl(hold)
    # The held time (4 s) is longer than the wall limit: it must not count.
    limits = dataclasses.replace(LIMITS, wall_seconds=3.0)
    task = asyncio.ensure_future(
        sandbox.run(kind="python", code=WORK, input=b"", limits=limits, control=control)
    )
    await wait_for(lambda: control.cpu_seconds() > 0.1, "the job to start computing")
    hold.set("pause", "paused by the volunteer")
    await wait_for(lambda: control.stopped, "the job to stop")
    await asyncio.sleep(0.3)  # let the stop reach every thread
    before = control.cpu_seconds()
    await asyncio.sleep(4.0)
    during = control.cpu_seconds() - before
    assert not task.done()
    hold.clear("pause")
    outcome = await task
    sandbox.close()
    assert during < 0.05, f"the held job used {during:.3f} CPU-seconds"
    assert outcome.kind is OutcomeKind.OK, outcome
    assert outcome.result is not None and b'"ok": true' in outcome.result
    assert outcome.paused_seconds >= 4.0


async def test_throttle_cannot_resume_a_held_job(tmp_path: Path) -> None:
    # Throttle stops and continues the tree every few ms; the hold must win.
    sandbox = Sandbox(work_root=tmp_path / "w", mode=ExecutionMode(kind="throttle", cpu_percent=50))
    hold = Hold()
    control = JobControl(hold)
    task = asyncio.ensure_future(
        sandbox.run(kind="python", code=WORK, input=b"", limits=LIMITS, control=control)
    )
    await wait_for(lambda: control.cpu_seconds() > 0.1, "the job to start computing")
    hold.set("battery", "battery low")
    await asyncio.sleep(0.5)
    before = control.cpu_seconds()
    await asyncio.sleep(2.0)
    during = control.cpu_seconds() - before
    hold.clear("battery")
    outcome = await task
    sandbox.close()
    assert during < 0.05, f"the held, throttled job used {during:.3f} CPU-seconds"
    assert outcome.kind is OutcomeKind.OK, outcome


class _CountingTree:
    """Only counts suspend/resume calls (HeldTree's bookkeeping is what is tested)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pids(self) -> list[int]:
        return []

    def suspend(self) -> None:
        self.calls.append("suspend")

    def resume(self) -> None:
        self.calls.append("resume")

    def cpu_seconds(self) -> float:
        return 0.0


def test_held_tree_counts_stopped_time_once() -> None:
    now = [0.0]
    tree = _CountingTree()
    gate = HeldTree(tree, clock=lambda: now[0])
    gate.suspend()  # the mode stops it at t=0
    now[0] = 1.0
    gate.hold(True)  # the hold too: no second stop
    now[0] = 2.0
    gate.resume()  # the mode lets go: still held
    now[0] = 5.0
    gate.hold(False)
    assert tree.calls == ["suspend", "resume"]
    assert gate.paused_seconds == 5.0
    now[0] = 9.0
    assert gate.paused_seconds == 5.0


def test_hold_notifies_on_first_reason_and_last_clear() -> None:
    hold = Hold()
    seen: list[bool] = []
    unsubscribe = hold.subscribe(seen.append)
    hold.set("pause", "a")
    hold.set("battery", "b")
    hold.clear("pause")
    hold.clear("battery")
    hold.clear("battery")
    unsubscribe()
    hold.set("pause", "a")
    assert seen == [True, False]
