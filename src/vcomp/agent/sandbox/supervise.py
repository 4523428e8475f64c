"""Supervising one running job: the loop that enforces its wall, idle, CPU and memory
limits and kills the tree, and the classification of how the job ended."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Sequence

from vcomp.agent.modes import ExecutionMode, Regulator
from vcomp.agent.sandbox.hold import HeldTree, JobControl
from vcomp.agent.sandbox.launch import Launch
from vcomp.agent.sandbox.outcome import JobOutcome, OutcomeKind, Protection
from vcomp.agent.sandbox.pipes import Checkpointing, JobIO
from vcomp.agent.sandbox.policy import JobLimits
from vcomp.agent.sandbox.protections import from_setup, missing_required
from vcomp.agent.sandbox.tree import JobTree
from vcomp.guest import EXIT_NO_MEMORY

OUT_OF_MEMORY = "the kernel killed a job process at the job's memory limit (cgroup)"
MEMORY_HINTS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")
TICK = 0.1  # how often CPU and memory are sampled
KILL_GRACE = 5.0  # how long to wait for a killed tree to be reaped


async def supervise(
    launch: Launch,
    input_bytes: bytes,
    limits: JobLimits,
    *,
    mode: ExecutionMode | None,
    required: Sequence[str],
    on_progress: Callable[[float], None] | None,
    cancel: asyncio.Event | None,
    started: float,
    control: JobControl | None = None,
    checkpoints: Checkpointing | None = None,
) -> JobOutcome:
    """Feed the job, watch it until it ends or breaks a limit, kill and reap its tree."""
    tree = JobTree(launch.pid, launch.cgroup)
    # The mode's regulator and the volunteer's hold both stop the tree through this.
    gate = HeldTree(tree)
    regulator = Regulator(mode) if mode is not None else None

    def active_clock() -> float:
        # Time the job stood stopped (its mode, or the volunteer's hold) does not count.
        return time.monotonic() - gate.paused_seconds

    io = JobIO(launch, input_bytes, limits, on_progress, active_clock, checkpoints)
    reg_task: asyncio.Task[None] | None = None
    kill_reason: tuple[OutcomeKind, str] | None = None
    try:
        io.attach(asyncio.get_running_loop())
        start_active = active_clock()
        last_sample = 0.0
        while io.job_status is None:
            if io.job_pid is not None and tree.job_pid is None:
                tree.job_pid = io.job_pid
                if control is not None:
                    control.attach(gate)
                if regulator is not None:
                    reg_task = asyncio.create_task(regulator.supervise(gate))
            now_active = active_clock()
            wall_left = limits.wall_seconds - (now_active - start_active)
            idle_left = math.inf
            if limits.idle_seconds is not None:
                idle_left = limits.idle_seconds - (now_active - io.last_frame_at)
            if io.violation is not None:
                kill_reason = io.violation
            elif io.setup_failure is not None:
                kill_reason = (OutcomeKind.SETUP_FAILED, io.setup_failure)
            elif cancel is not None and cancel.is_set():
                kill_reason = (OutcomeKind.CANCELLED, "cancelled by the agent")
            elif wall_left <= 0:
                kill_reason = (OutcomeKind.WALL_TIMEOUT, f"wall limit {limits.wall_seconds}s")
            elif idle_left <= 0:
                kill_reason = (OutcomeKind.IDLE_TIMEOUT, f"no frame for {limits.idle_seconds}s")
            elif time.monotonic() - last_sample >= TICK:
                last_sample = time.monotonic()
                tree.sample_memory()
                if tree.job_pid is not None and tree.cpu_seconds() > limits.cpu_seconds:
                    kill_reason = (
                        OutcomeKind.CPU_LIMIT,
                        f"tree over {limits.cpu_seconds}s CPU",
                    )
                elif tree.out_of_memory():
                    kill_reason = (OutcomeKind.MEMORY_LIMIT, OUT_OF_MEMORY)
            if kill_reason is not None:
                break
            await io.wait(min(wall_left, idle_left, TICK))
        if kill_reason is None:
            tree.cpu_seconds()  # a last sample before the sweep
        tree.kill()
        await io.finish(tree, KILL_GRACE)
    finally:
        # Also on cancellation: nothing of the job may outlive this call.
        tree.kill()
        if control is not None:
            control.detach()
        gate.release()
        io.detach()
        if reg_task is not None:
            reg_task.cancel()
        await _reap(launch.pid, tree)
    if reg_task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await reg_task
    paused = gate.paused_seconds
    prots, failure = from_setup(io.setup_text(), mode=mode, cgroup_note=launch.cgroup_note)
    if kill_reason is None and failure is None:
        failure = missing_required(prots, required)
    return classify(
        io=io,
        tree=tree,
        limits=limits,
        kill_reason=kill_reason,
        setup_failure=failure,
        wall_seconds=time.monotonic() - started,
        paused_seconds=paused,
        protections=tuple(prots),
    )


async def _reap(pid: int, tree: JobTree) -> None:
    """Wait until the launcher is gone and reaped, killing it if it lingers past
    KILL_GRACE. The wait polls with backoff and sleeps on the loop: the loop is shared
    by every worker of the agent, and a launcher outlives its job's kill while the
    job's namespaces are torn down (long for a job that filled its memory or tmpfs).
    """
    deadline = time.monotonic() + KILL_GRACE
    delay = 0.002
    try:
        while not _reaped(pid):
            if time.monotonic() > deadline:
                _kill_and_reap(pid, tree)
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.05)
    except asyncio.CancelledError:
        _kill_and_reap(pid, tree)  # cancelled while waiting: still leave no process
        raise


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _kill_and_reap(pid: int, tree: JobTree) -> None:
    """The last resort: SIGKILL the tree and the launcher, then reap it (at once)."""
    tree.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def classify(
    *,
    io: JobIO,
    tree: JobTree,
    limits: JobLimits,
    kill_reason: tuple[OutcomeKind, str] | None,
    setup_failure: str | None,
    wall_seconds: float,
    paused_seconds: float,
    protections: tuple[Protection, ...],
) -> JobOutcome:
    """Turn what was observed into one typed outcome."""
    status = io.job_status
    exit_code = sig = None
    cpu = tree.cpu_seconds()
    tree.sample_memory()  # the cgroup's peak, once more after the end
    peak = tree.peak_memory_bytes
    if status is not None:
        ws = status.wait_status
        if os.WIFEXITED(ws):
            exit_code = os.WEXITSTATUS(ws)
        elif os.WIFSIGNALED(ws):
            sig = os.WTERMSIG(ws)
        cpu = max(cpu, status.user_seconds + status.system_seconds)
    # Any process of the tree killed at the cgroup's limit fails the whole job.
    out_of_memory = tree.out_of_memory(killed=sig == signal.SIGKILL or status is None)

    def memory_evidence() -> bool:
        if tree.peak_vm_bytes >= 0.9 * limits.memory_bytes:
            return True
        return any(hint in io.stderr.tail for hint in MEMORY_HINTS)

    kind: OutcomeKind
    error = io.error
    if kill_reason is not None:
        kind, error = (
            kill_reason[0],
            kill_reason[1] + (f"; job said: {io.error}" if io.error else ""),
        )
    elif setup_failure is not None:
        kind, error = OutcomeKind.SETUP_FAILED, setup_failure
    elif out_of_memory:
        kind, error = OutcomeKind.MEMORY_LIMIT, OUT_OF_MEMORY
    elif status is None:
        kind, error = OutcomeKind.SETUP_FAILED, "the launcher ended without reporting the job"
    elif sig is not None:
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_seconds):
            kind = OutcomeKind.CPU_LIMIT
        elif sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT) and memory_evidence():
            kind = OutcomeKind.MEMORY_LIMIT
        else:
            kind = OutcomeKind.SIGNALED
    elif exit_code == 0:
        if io.result is not None and io.error is None:
            kind = OutcomeKind.OK
        elif io.error is not None:
            kind, error = OutcomeKind.PROTOCOL_VIOLATION, f"ERROR with exit status 0: {io.error}"
        else:
            kind, error = OutcomeKind.PROTOCOL_VIOLATION, "exit status 0 without a RESULT"
    elif exit_code == EXIT_NO_MEMORY or memory_evidence():
        kind = OutcomeKind.MEMORY_LIMIT
    else:
        kind = OutcomeKind.NONZERO_EXIT
    return JobOutcome(
        kind=kind,
        result=io.result if kind is OutcomeKind.OK else None,
        error=error,
        exit_code=exit_code,
        signal=sig,
        cpu_seconds=round(cpu, 3),
        wall_seconds=round(wall_seconds, 3),
        paused_seconds=round(paused_seconds, 3),
        peak_memory_bytes=peak or None,
        progress=io.progress,
        stdout_tail=bytes(io.stdout.tail),
        stderr_tail=bytes(io.stderr.tail),
        protections=protections,
    )
