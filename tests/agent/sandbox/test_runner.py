"""Sandbox.run end to end: happy paths, progress, outcomes, cancellation, hygiene."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from vcomp.agent.modes import ExecutionMode
from vcomp.agent.sandbox import JobLimits, OutcomeKind, Sandbox
from vcomp.agent.sandbox.wipe import empty_dir

from .conftest import EXAMPLES, LIMITS, assert_still_works, job, processes_with, run_python


async def test_python_pi_job(sandbox: Sandbox) -> None:
    seen: list[float] = []
    outcome = await sandbox.run(
        kind="python",
        code=(EXAMPLES / "pi.py").read_bytes(),
        input=b'{"points": 20000, "seed": 7}',
        limits=LIMITS,
        on_progress=seen.append,
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    result = json.loads(outcome.result or b"")
    assert result["points"] == 20000
    assert abs(4 * result["inside"] / 20000 - 3.14159) < 0.1
    # Coalesced and rate-limited (domain.md, "PROGRESS floods"): the latest value counts.
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    assert outcome.progress == 1.0
    assert outcome.exit_code == 0


async def test_native_pi_job(sandbox: Sandbox, pi_binary: bytes) -> None:
    seen: list[float] = []
    outcome = await sandbox.run(
        kind="exec",
        code=pi_binary,
        input=b'{"points": 1000000, "seed": 3}',
        limits=LIMITS,
        on_progress=seen.append,
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    result = json.loads(outcome.result or b"")
    assert abs(4 * result["inside"] / 1_000_000 - 3.14159) < 0.01
    assert 1 <= len(seen) <= 101 and seen[-1] == 1.0 and seen == sorted(seen)
    again = await sandbox.run(
        kind="exec", code=pi_binary, input=b'{"points": 1000000, "seed": 3}', limits=LIMITS
    )
    assert again.result == outcome.result  # the seed makes it reproducible


async def test_native_job_runs_from_a_memfd_with_a_clean_environment(
    sandbox: Sandbox, pi_binary: bytes
) -> None:
    code = job("""
return json.dumps({
    "exe": os.readlink("/proc/self/exe"),
    "env": dict(os.environ),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "cwd_entries": os.listdir("."),
    "uid": os.getuid(),
    "pid": os.getpid(),
    "hostname": os.uname().nodename,
}).encode()
""")
    os.environ["VCOMP_TEST_SECRET"] = "do-not-leak"
    try:
        outcome = await run_python(sandbox, code)
    finally:
        del os.environ["VCOMP_TEST_SECRET"]
    assert outcome.kind is OutcomeKind.OK, outcome
    info = json.loads(outcome.result or b"")
    assert set(info["env"]) == {"PATH", "LANG", "HOME", "TMPDIR"}
    assert "VCOMP_TEST_SECRET" not in json.dumps(info["env"])
    # 0-4 are the job's; the one above is the descriptor listdir itself holds.
    assert info["fds"][:5] == [0, 1, 2, 3, 4] and len(info["fds"]) <= 6
    assert info["cwd_entries"] == []
    if os.geteuid() == 0:
        assert info["uid"] == 65534
    assert info["pid"] == 2  # the init of its pid namespace is pid 1
    assert info["hostname"] == "vcomp-job"


async def test_exec_job_image_is_a_memfd(sandbox: Sandbox) -> None:
    # A native job that is a copy of /bin/cat reading its own /proc/self/exe link.
    code = Path("/bin/readlink").read_bytes()
    outcome = await sandbox.run(kind="exec", code=code, input=b"", limits=LIMITS)
    # readlink with no arguments exits nonzero; what matters is that it ran from memory.
    assert outcome.kind is OutcomeKind.NONZERO_EXIT, outcome
    assert b"missing operand" in outcome.stderr_tail


async def test_work_dir_is_private_and_wiped(sandbox: Sandbox) -> None:
    code = job("""
open("big.bin", "wb").write(b"x" * 100000)
os.mkdir("sub")
os.chmod("sub", 0)
return os.getcwd().encode()
""")
    outcome = await run_python(sandbox, code)
    assert outcome.kind is OutcomeKind.OK, outcome
    assert not Path((outcome.result or b"").decode()).exists()
    assert list(sandbox.work_root.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "kind", "exit_code"),
    [
        ("raise RuntimeError('boom')", OutcomeKind.NONZERO_EXIT, 1),
        ("os._exit(3)", OutcomeKind.NONZERO_EXIT, 3),
        ("os.kill(os.getpid(), signal.SIGSEGV)", OutcomeKind.SIGNALED, None),
        ("ctypes.string_at(0)", OutcomeKind.SIGNALED, None),
        ("os._exit(0)", OutcomeKind.PROTOCOL_VIOLATION, 0),
    ],
)
async def test_failure_outcomes(
    sandbox: Sandbox, body: str, kind: OutcomeKind, exit_code: int | None
) -> None:
    outcome = await run_python(sandbox, job(body))
    assert outcome.kind is kind, outcome
    assert outcome.exit_code == exit_code
    if kind is OutcomeKind.SIGNALED:
        assert outcome.signal == 11
    if exit_code == 1:
        assert outcome.error == "RuntimeError: boom"
        assert b"Traceback" in outcome.stderr_tail


async def test_outcome_lists_protections(sandbox: Sandbox) -> None:
    outcome = await run_python(sandbox, job("return b''"))
    names = {p.name for p in outcome.protections}
    for name in ("rlimits", "seccomp", "landlock", "pid_namespace", "process_tree_kill"):
        assert name in names
    assert {p.status for p in outcome.protections} <= {"active", "unavailable", "failed"}
    assert set(outcome.active_protections()) >= {"rlimits", "cleared_environment"}


async def test_task_cancellation_kills_the_tree(sandbox: Sandbox) -> None:
    token = secrets.token_hex(6)
    code = job(f"""
if os.fork() == 0:
    os.execv("/bin/sleep", ["sleep-{token}", "300"])
progress(0.5)
time.sleep(300)
""")
    started = asyncio.Event()
    task = asyncio.create_task(
        sandbox.run(
            kind="python",
            code=code,
            input=b"",
            limits=LIMITS,
            on_progress=lambda _f: started.set(),
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    # The forked child may still be exec'ing when the parent reports progress.
    for _ in range(100):
        if processes_with(f"sleep-{token}"):
            break
        await asyncio.sleep(0.05)
    assert processes_with(f"sleep-{token}") != []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_with(f"sleep-{token}") == []
    assert list(sandbox.work_root.iterdir()) == []
    await assert_still_works(sandbox)


async def test_cancel_event_gives_cancelled_outcome(sandbox: Sandbox) -> None:
    cancel = asyncio.Event()
    code = job("progress(0.1)\ntime.sleep(300)")
    outcome_task = asyncio.create_task(
        sandbox.run(
            kind="python",
            code=code,
            input=b"",
            limits=LIMITS,
            on_progress=lambda _f: cancel.set(),
            cancel=cancel,
        )
    )
    outcome = await asyncio.wait_for(outcome_task, 10)
    assert outcome.kind is OutcomeKind.CANCELLED


async def test_big_input_and_output(sandbox: Sandbox) -> None:
    data = os.urandom(3 << 20)
    limits = dataclasses.replace(LIMITS, output_bytes=4 << 20)
    outcome = await run_python(sandbox, job("return data[::-1]"), data, limits)
    assert outcome.kind is OutcomeKind.OK
    assert outcome.result == data[::-1]


async def test_dedicated_mode_pins_the_job(tmp_path: Path) -> None:
    core = max(os.sched_getaffinity(0))
    sandbox = Sandbox(work_root=tmp_path / "w", mode=ExecutionMode(kind="dedicated", core=core))
    outcome = await run_python(
        sandbox, job("return json.dumps(sorted(os.sched_getaffinity(0))).encode()")
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    assert json.loads(outcome.result or b"") == [core]


async def test_throttled_time_does_not_count_against_the_wall_clock(tmp_path: Path) -> None:
    mode = ExecutionMode(kind="throttle", cpu_percent=10)
    sandbox = Sandbox(work_root=tmp_path / "w", mode=mode)
    limits = dataclasses.replace(LIMITS, wall_seconds=1.5)
    code = job("""
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
return b"done"
""")
    outcome = await run_python(sandbox, code, limits=limits)
    # 0.3 s of CPU at 10% takes ~3 s of wall time, of which ~2.7 s are paused.
    assert outcome.kind is OutcomeKind.OK, outcome
    assert outcome.paused_seconds > 1.0
    assert outcome.wall_seconds > limits.wall_seconds


async def test_background_mode_runs_a_job(tmp_path: Path) -> None:
    # A threshold the machine cannot exceed, so other load does not suspend the job here.
    mode = ExecutionMode(kind="background", busy_threshold=1.0)
    sandbox = Sandbox(work_root=tmp_path / "w", mode=mode)
    code = job("return str(os.getpriority(os.PRIO_PROCESS, 0)).encode()")
    outcome = await run_python(sandbox, code)
    assert outcome.kind is OutcomeKind.OK, outcome
    assert outcome.result == b"19"


async def test_setup_failure_is_an_outcome(tmp_path: Path) -> None:
    sandbox = Sandbox(work_root=tmp_path / "w", python="/nonexistent/python3")
    outcome = await run_python(sandbox, job("return b''"))
    assert outcome.kind is OutcomeKind.SETUP_FAILED
    assert outcome.error is not None and "nonexistent" in outcome.error


def test_unknown_kind_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(Exception, match="kind"):
        asyncio.run(sandbox.run(kind="java", code=b"", input=b"", limits=LIMITS))  # type: ignore[arg-type]


_ = JobLimits


async def test_prepared_launcher_is_used_and_closed(tmp_path: Path) -> None:
    sandbox = Sandbox(work_root=tmp_path / "w")
    await assert_still_works(sandbox)  # cold start, then a launcher is prepared
    spare = sandbox._spare
    assert spare is not None
    await asyncio.sleep(0.05)
    await assert_still_works(sandbox)  # ran in the prepared launcher
    assert sandbox._spare is not None and sandbox._spare is not spare
    pid = sandbox._spare.pid
    sandbox.close()
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(Exception, match="closed"):
        await run_python(sandbox, job("return b''"))


async def test_dead_prepared_launcher_falls_back_to_a_fresh_one(tmp_path: Path) -> None:
    sandbox = Sandbox(work_root=tmp_path / "w")
    await assert_still_works(sandbox)
    assert sandbox._spare is not None
    os.kill(sandbox._spare.pid, 9)
    await asyncio.sleep(0.05)
    await assert_still_works(sandbox)
    sandbox.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting inside the work dir needs root")
async def test_a_failed_wipe_is_logged_and_the_outcome_still_returned(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount the agent's wipe cannot remove (made here, from outside the job, in the
    host side of the work dir) leaves the tree in place: the failure is logged without
    the job's names, the job's outcome comes back, and the next job runs."""
    code = job("""
progress(0.5)
return b"done"
""")
    mounted: list[Path] = []

    def mount_inside(_fraction: float) -> None:
        if not mounted:
            workdir = next(sandbox.work_root.glob("job-*"))
            (workdir / "m").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "none", str(workdir / "m")], check=True)
            mounted.append(workdir / "m")
            (workdir / "m" / "on-the-mount").touch()

    try:
        outcome = await sandbox.run(
            kind="python", code=code, input=b"", limits=LIMITS, on_progress=mount_inside
        )
        assert (mounted[0] / "on-the-mount").exists()  # the wipe stayed off that file system
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], check=True)
    assert outcome.kind is OutcomeKind.OK and outcome.result == b"done", outcome
    failures = [r.getMessage() for r in caplog.records if "workdir_wipe_failed" in r.getMessage()]
    assert failures and "entries left" in failures[0]
    await assert_still_works(sandbox)
    assert empty_dir(sandbox.work_root) == 1  # what start-up clears


async def test_readme_names_exactly_the_environment_a_job_gets(sandbox: Sandbox) -> None:
    """The README and `doctor` (cleared_environment) must tell the same story."""
    outcome = await run_python(sandbox, job("return json.dumps(dict(os.environ)).encode()"))
    assert outcome.kind is OutcomeKind.OK, outcome
    env = json.loads(outcome.result or b"")
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    section = readme[readme.index("## What runs on the volunteer's machine") :]
    section = section[: section.index("What bounds what")]
    assert "empty environment" not in section
    for name in env:
        assert f"`{name}`" in section, name
    doctor = {p.name: p.reason for p in outcome.protections}["cleared_environment"]
    assert sorted(doctor.split(",")) == sorted(env)
