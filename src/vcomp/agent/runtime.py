"""The volunteer agent: sessions to the organisation, jobs into the sandbox.

:class:`AgentRuntime` measures itself into the simulated TPM, then runs one
worker per configured core. Each worker keeps a session to one of the
organisation's servers, runs received jobs in the sandbox, spools each result
sealed to the TPM before sending it, and deletes it only when a server confirms
the commit.

Failover: when a session ends, or a server does not answer, the worker tries the
next server in the list (workers start at different offsets, so an agent's
workers spread), waiting a jittered backoff that resets after an established
session and doubles after a full round of failures. A job cancelled because its
session ended is reported lost (``JOB_LOST``) at the next established session,
to whichever server, so the store requeues it at once instead of at lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import logging
import os
import random
import signal
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from vcomp import logfmt
from vcomp.agent.checkpoints import (
    JobCheckpoints,
    interrupted_attempts,
    job_binding,
    sweep_stale,
)
from vcomp.agent.config import AgentConfig
from vcomp.agent.measure import measured_launch
from vcomp.agent.modes import ExecutionMode, agent_setup
from vcomp.agent.preferences.controller import PreferenceController
from vcomp.agent.preferences.memory import MemoryBudget
from vcomp.agent.preferences.rate import TokenBucket
from vcomp.agent.sandbox import Checkpointing, JobKind, JobOutcome, OutcomeKind
from vcomp.agent.sandbox.hold import Hold, JobControl
from vcomp.agent.sandbox.wipe import empty_dir
from vcomp.agent.spool import ResultSpool, SpooledResult, SpoolError
from vcomp.agent.status import AgentTotals, StatusServer, runtime_status
from vcomp.agent.tpm import TpmError
from vcomp.agent.tpm_backend import Tpm
from vcomp.errors import ConfigError, SessionClosed, loggable
from vcomp.protocol import events as ev
from vcomp.protocol import limits
from vcomp.protocol.agent_session import AgentSession, AgentState
from vcomp.protocol.channel import clip_text
from vcomp.protocol.handshake import key_fingerprint
from vcomp.protocol.messages import ErrorCode
from vcomp.transport import AgentAdapter, open_agent

log = logging.getLogger("vcomp.agent")

REFUSED = "refused"
AGENT_ERROR = "agent_error"  # the agent failed around the job; its outcome is unknown
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
MAX_LOST = 4  # lost jobs a worker remembers: normally one; servers take 4 a session
KEY_MISMATCH_LIMIT = 3  # handshakes in a row with a wrong server key before giving up
LOCK_FILE = "agent.lock"
# What a volunteer can do about a refusal; the reason itself comes from the server.
REFUSAL_HINTS = {
    "unknown_key": "this agent is not enrolled: send the line that `vcomp-agent enrolment "
    "--line` prints to the organisation (they run vcomp-server enroll LINE)",
    "measurement_not_allowed": "the organisation has not allowed this agent build: send "
    "them the line that `vcomp-agent measure` prints (vcomp-server allow-measurement)",
}


@dataclass
class WorkerStats:
    sessions: int = 0
    jobs: int = 0
    committed: int = 0
    rejected: int = 0
    last_reject: str = ""


@dataclass
class _Running:
    job: int
    attempt: int
    task: asyncio.Task[None]
    started: float = field(default_factory=time.monotonic)
    control: JobControl = field(default_factory=JobControl)
    progress: float | None = None
    waiting_for_memory: bool = False  # other jobs hold the memory it needs (max_memory)


class Worker:
    """One session at a time to the server, and at most one job."""

    def __init__(self, runtime: AgentRuntime, index: int) -> None:
        self.rt = runtime
        self.index = index
        self.stats = WorkerStats()
        self.session: AgentSession | None = None
        self.adapter: AgentAdapter | None = None
        self.running: _Running | None = None
        self._closed = asyncio.Event()
        self.wake = asyncio.Event()  # the hold changed or a job ended: look again
        self._result_sent_at: dict[tuple[int, int], float] = {}
        self._connect_started = 0.0
        self._server = ""  # the address of the current session's server
        # Jobs cancelled because their session ended, reported at the next session.
        self.lost: list[tuple[int, int]] = []
        work_root = runtime.config.work_dir / f"w{index}"
        clear_work_root(work_root, index)
        # Exactly the sandbox that PCR 18 measures.
        self.sandbox = runtime.config.make_sandbox(work_root=work_root)

    @property
    def server(self) -> str:
        """The current session's server, HOST:PORT ("" between sessions)."""
        return self._server if self.session is not None else ""

    # ---- session loop --------------------------------------------------------

    async def run(self) -> None:
        servers = self.rt.servers
        current = self.index % len(servers)  # workers of one agent start spread out
        backoff = BACKOFF_START
        failures = 0  # sessions in a row that were never established
        while not self.rt.stopping.is_set():
            if self.rt.hold.held:  # paused with no job: hold no session, take no lease
                await _first(self.rt.stopping.wait(), self.rt.released.wait())
                continue
            connected = await self._one_session(servers[current])
            if self.rt.stopping.is_set():
                break
            if connected:
                backoff, failures = BACKOFF_START, 0
            else:
                failures += 1
                if failures % len(servers) == 0:  # a full round failed
                    backoff = min(backoff * 2, BACKOFF_MAX)
            after = (current + 1) % len(servers)
            if after != current:
                logfmt.event(
                    log,
                    "server_switch",
                    logging.INFO,
                    worker=self.index,
                    **{"from": format_address(servers[current])},
                    to=format_address(servers[after]),
                )
                current = after
            delay = backoff * random.uniform(0.5, 1.5)
            logfmt.event(log, "reconnect_wait", worker=self.index, seconds=round(delay, 2))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), delay)

    async def _one_session(self, server: tuple[str, int]) -> bool:
        loop = asyncio.get_running_loop()
        cfg = self.rt.config
        session = AgentSession(
            agent_id=self.rt.tpm.agent_id,
            pinned_server=self.rt.pinned,
            quote=lambda extra, pcrs: self.rt.quote(extra),
            now=loop.time(),
            capacity=cfg.limits.capacity(cfg.preferences.max_memory),
        )
        self.session = session
        self._closed.clear()
        self._release_all()
        host, port = server
        self._server = format_address(server)
        logfmt.event(log, "connecting", worker=self.index, server=self._server)
        try:
            adapter = await open_agent(
                session,
                self._on_event,
                host,
                port,
                upload=self.rt.upload,
                download=self.rt.download,
            )
        except OSError as exc:
            logfmt.event(
                log,
                "connect_failed",
                logging.WARNING,
                server=format_address(server),
                error=str(exc),
            )
            return False
        self.adapter = adapter
        self._connect_started = time.monotonic()
        session.connect(loop.time())
        adapter.kick()
        sessions_before = self.stats.sessions
        try:
            while not self._closed.is_set():
                await _first(self.rt.stopping.wait(), self._closed.wait(), self.wake.wait())
                self.wake.clear()
                if self.rt.stopping.is_set():
                    await self._leave(session, adapter)
                    break
                if self.rt.hold.held and self._idle() and not self._closed.is_set():
                    # A running job stays (stopped) in its session; an idle worker leaves
                    # once its results are committed, so no lease waits on a paused machine.
                    logfmt.event(log, "session_left_while_held", worker=self.index)
                    await self._leave(session, adapter, reason="agent paused")
                    break
        finally:
            lost = await self._cancel_job("session ended")
            if lost is not None and not self.rt.stopping.is_set():
                self.lost = [*self.lost, lost][-MAX_LOST:]
            adapter.close()
            self.session = None
            self.adapter = None
        return self.stats.sessions > sessions_before

    def _idle(self) -> bool:
        """No job here and no result of ours waiting for its commit."""
        return self.running is None and self.index not in self.rt.in_flight.values()

    async def _leave(
        self, session: AgentSession, adapter: AgentAdapter, reason: str = "agent shutting down"
    ) -> None:
        """SIGTERM: let the job finish within the grace period, else hand it back."""
        grace = self.rt.shutdown_grace
        running = self.running
        if running is not None:
            try:
                await asyncio.wait_for(asyncio.shield(running.task), grace)
            except asyncio.CancelledError:
                # The job was aborted meanwhile (its task cancelled), not this shutdown.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except TimeoutError:
                await self._cancel_job("agent shutting down")
                session.abandon_job(
                    job=running.job, attempt=running.attempt, reason="agent shutting down"
                )
                adapter.kick()
                logfmt.event(log, "job_handed_back", job=running.job, attempt=running.attempt)
        # Give the server a moment to confirm what we sent, then say goodbye.
        deadline = time.monotonic() + min(grace, 5.0)
        while (
            session.state is not AgentState.CLOSED
            and session.channel is not None
            and not session.channel.send_idle
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        if session.state is not AgentState.CLOSED:
            session.close(reason, asyncio.get_running_loop().time())
            adapter.kick()
            await asyncio.sleep(0.05)

    # ---- events --------------------------------------------------------------

    def _drop_spooled(self, job: int, attempt: int) -> None:
        """The job's spooled result and checkpoint are no longer needed."""
        self.rt.spool.remove(job, attempt)
        self.rt.spool.remove_checkpoint(job)

    def _settled(self, job: int, attempt: int) -> None:
        """The server committed or refused this result, whoever sent it."""
        self._drop_spooled(job, attempt)
        self.rt.in_flight.pop((job, attempt), None)
        self.wake.set()

    def _on_event(self, e: ev.Event) -> None:
        session = self.session
        if session is None:
            return
        if isinstance(e, ev.Connected):
            self.stats.sessions += 1
            self.rt.key_mismatches = 0
            handshake_ms = int((time.monotonic() - self._connect_started) * 1000)
            logfmt.event(
                log,
                "session_established",
                worker=self.index,
                server=self._server,
                session=f"{e.session_id:016x}",
                handshake_ms=handshake_ms,
            )
            self._resend_spool(session)
            self._report_lost(session)
        elif isinstance(e, ev.JobReceived):
            self._start_job(e)
        elif isinstance(e, ev.JobAborted):
            logfmt.event(
                log,
                "job_aborted",
                worker=self.index,
                job=e.job,
                attempt=e.attempt,
                reason=logfmt.peer_text(e.reason),
            )
            if self.running is not None and (self.running.job, self.running.attempt) == (
                e.job,
                e.attempt,
            ):
                self.running.task.cancel()
                self.running = None
            self._drop_spooled(e.job, e.attempt)
        elif isinstance(e, ev.ResetReceived):
            logfmt.event(log, "reset_received", worker=self.index, epoch=e.epoch)
            # The reset dropped everything in flight: every uncommitted result goes again.
            self._release_all()
            self._resend_spool(session)
        elif isinstance(e, ev.ResultCommitted):
            self.stats.committed += 1
            self._settled(e.job, e.attempt)
            sent = self._result_sent_at.pop((e.job, e.attempt), None)
            result_ms = None if sent is None else int((time.monotonic() - sent) * 1000)
            logfmt.event(
                log,
                "result_committed",
                worker=self.index,
                job=e.job,
                attempt=e.attempt,
                result_ms=result_ms,
            )
        elif isinstance(e, ev.ResultRefused):
            logfmt.event(
                log,
                "result_refused",
                logging.ERROR,
                worker=self.index,
                job=e.job,
                attempt=e.attempt,
                code=e.code,
                message=logfmt.peer_text(e.message),
            )
            self._settled(e.job, e.attempt)
        elif isinstance(e, ev.HandshakeRetry):
            logfmt.event(
                log,
                "no_answer",
                worker=self.index,
                server=self._server,
                tries=e.tries,
                retry_in=f"{e.next_in:.1f}s",
            )
        elif isinstance(e, ev.Rejected):
            self.stats.rejected += 1
            self.stats.last_reject = logfmt.peer_text(e.reason)
            level = logging.ERROR if e.code == ErrorCode.SERVER_KEY_MISMATCH else logging.WARNING
            logfmt.event(
                log,
                "session_refused",
                level,
                worker=self.index,
                code=e.code,
                reason=logfmt.peer_text(e.reason),
                hint=REFUSAL_HINTS.get(e.reason),
            )
            if e.offered_key:
                self.rt.wrong_server_key(self._server, e.offered_key)
        elif isinstance(e, ev.SessionClosed):
            logfmt.event(
                log,
                "session_closed",
                worker=self.index,
                reason=logfmt.peer_text(e.reason),
                code=e.code,
            )
            self._release_all()
            self._closed.set()

    def _claim(self, key: tuple[int, int]) -> bool:
        """Take ``key`` for this worker's session; False if another worker sends it."""
        return self.rt.in_flight.setdefault(key, self.index) == self.index

    def _release_all(self) -> None:
        for key in [k for k, owner in self.rt.in_flight.items() if owner == self.index]:
            del self.rt.in_flight[key]

    def _resend_spool(self, session: AgentSession) -> None:
        for item in self.rt.spool.pending():
            if isinstance(item, SpoolError):
                logfmt.event(log, "spool_unreadable", logging.ERROR, error=str(item))
                continue
            key = (item.job, item.attempt)
            if not self._claim(key):
                continue
            self._submit(session, item)
            logfmt.event(
                log, "result_resent", worker=self.index, job=item.job, attempt=item.attempt
            )

    def _report_lost(self, session: AgentSession) -> None:
        """Tell this server which jobs ended with their sessions, so they are requeued now.

        Sent once, to whichever server this session is with: the store decides whether
        the attempt is still leased to this agent. If the report is lost too, the lease
        expires as before.
        """
        lost, self.lost = self.lost, []
        for job, attempt in lost:
            if self.rt.spool.has(job, attempt):
                continue  # it finished after all: the result goes instead
            session.report_lost_job(
                job=job, attempt=attempt, reason="the session that held this job ended"
            )
            logfmt.event(log, "job_reported_lost", worker=self.index, job=job, attempt=attempt)
        if lost and self.adapter is not None:
            self.adapter.kick()

    def _submit(self, session: AgentSession, r: SpooledResult) -> None:
        try:
            session.submit_result(
                job=r.job,
                attempt=r.attempt,
                status=r.status,
                output=r.output,
                detail=r.detail,
                cpu_ms=r.cpu_ms,
                wall_ms=r.wall_ms,
            )
        except SessionClosed:
            return  # stays spooled; resent on the next session
        if self.adapter is not None:
            self.adapter.kick()

    # ---- jobs ----------------------------------------------------------------

    def _start_job(self, e: ev.JobReceived) -> None:
        d = e.description
        self.stats.jobs += 1
        task = asyncio.ensure_future(self._run_job(e))
        self.running = _Running(d.job, d.attempt, task, control=self.rt.job_control())
        logfmt.event(
            log,
            "job_started",
            worker=self.index,
            job=d.job,
            attempt=d.attempt,
            kind=d.kind,
            code_bytes=d.code_size,
            input_bytes=d.input_size,
        )

    def _refusal(self, d: ev.JobDescription) -> str | None:
        if d.kind not in ("python", "exec"):
            return f"unknown job kind {d.kind!r}"
        if (never := self.rt.memory.refusal(d.memory_bytes)) is not None:
            return never  # it can never fit here; the server leases it elsewhere
        return self.rt.config.limits.refusal(
            job_bytes=d.code_size + d.input_size,
            cpu_seconds=d.cpu_seconds,
            memory_bytes=d.memory_bytes,
            wall_seconds=d.wall_seconds,
            output_bytes=d.output_bytes,
            disk_bytes=d.disk_bytes,
        )

    async def _run_job(self, e: ev.JobReceived) -> None:
        d = e.description
        started = time.monotonic()
        try:
            status, output, detail, cpu_ms = await self._execute(e)
        except Exception as exc:  # a failure here must not wedge the worker
            # The job's outcome is unknown; the server hears that this attempt failed.
            error = loggable(exc)
            logfmt.event(
                log,
                "job_agent_error",
                logging.ERROR,
                worker=self.index,
                job=d.job,
                attempt=d.attempt,
                error=error,
            )
            status, output, detail, cpu_ms = AGENT_ERROR, b"", f"agent error: {error}", 0
        wall_ms = int((time.monotonic() - started) * 1000)
        detail = clip_text(detail, limits.MAX_TEXT)  # as it goes on the wire, in bytes
        result = SpooledResult(d.job, d.attempt, status, detail, cpu_ms, wall_ms, output)
        try:
            self.rt.spool.put(result)
        except Exception as exc:  # send it anyway, only not crash-safe
            logfmt.event(
                log,
                "spool_failed",
                logging.ERROR,
                worker=self.index,
                job=d.job,
                attempt=d.attempt,
                error=loggable(exc),
            )
        logfmt.event(
            log,
            "job_finished",
            worker=self.index,
            job=d.job,
            attempt=d.attempt,
            status=status,
            cpu_ms=cpu_ms,
            wall_ms=wall_ms,
            output_bytes=len(output),
        )
        self.running = None
        self.wake.set()
        session = self.session
        if session is not None and session.state is not AgentState.CLOSED:
            self._claim((d.job, d.attempt))
            self._result_sent_at[(d.job, d.attempt)] = time.monotonic()
            self._submit(session, result)
        if status != REFUSED:
            await self.rt.record_job(cpu_ms / 1000)  # after the result is on its way

    async def _execute(self, e: ev.JobReceived) -> tuple[str, bytes, str, int]:
        """Run the job (or refuse it): its status, output, detail and CPU milliseconds."""
        d = e.description
        refusal = self._refusal(d)
        if refusal is not None:
            return REFUSED, b"", refusal, 0
        running = self.running
        control = running.control if running is not None else self.rt.job_control()
        kind: JobKind = "python" if d.kind == "python" else "exec"
        checkpoints = JobCheckpoints(
            self.rt.spool,
            d.job,
            d.attempt,
            job_binding(kind, e.code, e.input),
            max_bytes=self.rt.config.limits.max_checkpoint_bytes,
            upload=self._uploader(d) if d.checkpoint_bytes else None,
        )
        resume = checkpoints.resume(e.resume, d.resume_attempt)
        if resume is not None:
            logfmt.event(
                log,
                "job_resumed",
                worker=self.index,
                job=d.job,
                attempt=d.attempt,
                state_bytes=len(resume.state),
                source=resume.source,
                from_attempt=resume.attempt,
            )
        # Waits while other jobs hold the memory this one needs (max_memory).
        if running is not None:
            running.waiting_for_memory = not self.rt.memory.fits(d.memory_bytes)
        try:
            async with self.rt.memory.reserve(d.memory_bytes):
                if running is not None:
                    running.waiting_for_memory = False
                outcome = await self._sandbox_run(
                    e,
                    kind,
                    checkpoints.sandbox_side(None if resume is None else resume.state),
                    control,
                )
        finally:
            await checkpoints.close()
        output = (outcome.result or b"") if outcome.kind is OutcomeKind.OK else b""
        return str(outcome.kind), output, describe(outcome), int(outcome.cpu_seconds * 1000)

    def _uploader(self, d: ev.JobDescription) -> Callable[[bytes], bool]:
        """Hands a checkpoint of job ``d`` to the session of the moment (the server
        asked for them in START); False when there is none to take it."""

        def upload(state: bytes) -> bool:
            session = self.session
            if session is None or not session.submit_checkpoint(
                job=d.job, attempt=d.attempt, state=state
            ):
                return False
            if self.adapter is not None:
                self.adapter.kick()
            return True

        return upload

    async def _sandbox_run(
        self, e: ev.JobReceived, kind: JobKind, checkpoints: Checkpointing, control: JobControl
    ) -> JobOutcome:
        d = e.description

        def on_progress(fraction: float) -> None:
            if self.running is not None:
                self.running.progress = fraction

        return await self.sandbox.run(
            kind=kind,
            checkpoints=checkpoints,
            code=e.code,
            input=e.input,
            # The [sandbox] process and file limits are part of what PCR 18 vouches for.
            limits=self.rt.config.job_limits(
                cpu_seconds=d.cpu_seconds,
                memory_bytes=d.memory_bytes,
                wall_seconds=float(d.wall_seconds),
                output_bytes=d.output_bytes,
                disk_bytes=d.disk_bytes,
            ),
            on_progress=on_progress,
            control=control,
        )

    async def _cancel_job(self, reason: str) -> tuple[int, int] | None:
        """Stop the running job; returns its (job, attempt) if it was cut short."""
        running, self.running = self.running, None
        if running is None or running.task.done():
            return None
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running.task
        logfmt.event(
            log,
            "job_cancelled",
            worker=self.index,
            job=running.job,
            attempt=running.attempt,
            reason=reason,
        )
        return running.job, running.attempt


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def clear_work_root(work_root: Path, worker: int) -> None:
    """Remove what an earlier run left in a worker's work root (a crash mid-job, or a
    tree a failed wipe left). The agent starts without it if that fails."""
    try:
        removed = empty_dir(work_root)
    except Exception as exc:  # leftovers must not stop the agent
        logfmt.event(
            log, "work_root_not_cleared", logging.WARNING, worker=worker, error=loggable(exc)
        )
        return
    if removed:
        logfmt.event(log, "work_root_cleared", worker=worker, leftovers=removed)


def describe(outcome: JobOutcome) -> str:
    """RESULT's ``detail`` for a finished job (PROTOCOL.md section 5, RESULT): the
    outcome, exit code, signal, the job's ERROR text and the last stderr line, joined
    by "; ", cut to 256 UTF-8 bytes on a character boundary. Never logged here: it may
    echo job output."""
    parts = [str(outcome.kind)]
    if outcome.exit_code is not None and outcome.exit_code != 0:
        parts.append(f"exit code {outcome.exit_code}")
    if outcome.signal is not None:
        parts.append(f"signal {outcome.signal}")
    if outcome.error:
        parts.append(outcome.error)
    tail = outcome.stderr_tail.decode("utf-8", "replace").strip().splitlines()
    if tail and outcome.kind is not OutcomeKind.OK:
        parts.append(f"stderr: {tail[-1]}")
    return clip_text("; ".join(parts), limits.MAX_TEXT)


def lock_home(home: Path) -> int:
    """Hold the agent home for this process (flock on agent.lock); ConfigError if
    another agent holds it. Two agents on one home would share one identity, spool
    and TPM state."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"another vcomp-agent (pid {holder}) is already running with {home}; "
            "one agent home runs one agent (for a second agent, init another home)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class AgentRuntime:
    def __init__(self, config: AgentConfig, *, shutdown_grace: float = 10.0) -> None:
        self.config = config
        self.shutdown_grace = shutdown_grace
        self.stopping = asyncio.Event()
        lock = lock_home(config.home)
        # Released by close(), or when this object goes, whatever happened to run().
        self._unlock = weakref.finalize(self, os.close, lock)
        self.fatal: str | None = None  # a configuration error found while running
        self.key_mismatches = 0
        self.tpm: Tpm = config.open_tpm()
        try:
            self.measurement = measured_launch(self.tpm, config.policy())
            self.spool = ResultSpool(config.spool_dir, self.tpm)
        except BaseException:
            self.tpm.close()
            raise
        if self.spool.set_aside is not None:
            logfmt.event(
                log,
                "spool_set_aside",
                logging.WARNING,
                path=str(self.spool.set_aside),
                reason="sealed by a different agent build or sandbox policy; unreadable here",
            )
        sweep_stale(self.spool)
        # Results being sent, and by which worker, so workers never send one twice.
        self.in_flight: dict[tuple[int, int], int] = {}
        self.pinned = config.server_fingerprint()
        self.servers = config.server_addresses()
        self.mode: ExecutionMode = config.execution_mode()
        agent_setup(self.mode)
        # The volunteer's preferences: one hold over every job, one memory budget,
        # one rate cap each way over every session.
        prefs = config.preferences
        self.hold = Hold()
        self.finished_jobs_cpu = 0.0  # see jobs_cpu_seconds
        self.released = asyncio.Event()  # set while nothing holds jobs
        self.released.set()
        self.hold.subscribe(self._hold_changed)
        self.preferences = PreferenceController(
            prefs, self.hold, own_cpu_seconds=self.jobs_cpu_seconds
        )
        self.memory = MemoryBudget(prefs.max_memory)
        now = time.monotonic()  # the event loop's clock, which the adapters pass in
        self.upload = TokenBucket(prefs.max_upload_rate, now) if prefs.max_upload_rate else None
        self.download = (
            TokenBucket(prefs.max_download_rate, now) if prefs.max_download_rate else None
        )
        self.totals = AgentTotals.load(config.stats_path)
        self._totals_saving = asyncio.Lock()
        self.started_at = time.time()
        self.workers = [Worker(self, i) for i in range(config.cores)]
        # Jobs a killed or rebooted run of this agent was running: reported lost at the
        # first session so the server requeues them now; they resume from the checkpoint.
        for n, held in enumerate(interrupted_attempts(self.spool)[-MAX_LOST * config.cores :]):
            self.workers[n % len(self.workers)].lost.append(held)

    def _hold_changed(self, held: bool) -> None:
        if held:
            self.released.clear()
        else:
            self.released.set()
        for w in self.workers:
            w.wake.set()

    def job_control(self) -> JobControl:
        """A running job's handle: the shared hold, and its CPU counted when it ends."""
        return JobControl(self.hold, on_done=self._job_done)

    def _job_done(self, cpu_seconds: float) -> None:
        self.finished_jobs_cpu += cpu_seconds

    def jobs_cpu_seconds(self) -> float:
        """CPU-seconds of every job this agent ran, cumulative (never goes down)."""
        live = (w.running.control for w in self.workers if w.running is not None)
        return self.finished_jobs_cpu + sum(c.cpu_seconds() for c in live if not c.done)

    async def record_job(self, cpu_seconds: float) -> None:
        """Count a job this agent ran (refusals are not work) in the saved totals."""
        self.totals.record(cpu_seconds, date.today())
        async with self._totals_saving:  # one write at a time, each of the latest totals
            try:
                await asyncio.to_thread(self.totals.save, self.config.stats_path)
            except OSError as exc:
                logfmt.event(log, "stats_not_saved", logging.WARNING, error=loggable(exc))

    def command(self, name: str) -> dict[str, Any]:
        """A request on the status socket: ``status``, ``pause`` or ``resume``."""
        if name == "pause":
            self.preferences.pause()
            logfmt.event(log, "agent_paused", reasons=",".join(self.hold.reasons))
        elif name == "resume":
            self.preferences.resume()
            logfmt.event(log, "agent_resumed", still_held=",".join(self.hold.reasons))
        return runtime_status(self)

    async def run(self) -> None:
        logfmt.event(
            log,
            "agent_started",
            agent=self.tpm.agent_id.hex()[:16],
            servers=",".join(self.config.servers),
            mode=self.mode.kind,
            cores=len(self.workers),
            measurement=self.measurement.format(),
            spooled=len(self.spool),
        )
        status = StatusServer(self.config.status_socket, self.command)
        try:
            await status.start()
        except OSError as exc:  # the agent still works; only `status` cannot reach it
            logfmt.event(log, "status_socket_failed", logging.WARNING, error=loggable(exc))
        try:
            await asyncio.gather(
                self.preferences.run(self.stopping), *(w.run() for w in self.workers)
            )
        finally:
            await status.close()
            for w in self.workers:
                w.sandbox.close()
            self.close()
        logfmt.event(log, "agent_stopped")
        if self.fatal is not None:
            raise ConfigError(self.fatal)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        """Release the TPM and the agent home (run() does it when it ends)."""
        self.tpm.close()
        self._unlock()

    def quote(self, extra: bytes) -> tuple[bytes, bytes, list[bytes]]:
        """Quote the PCRs this TPM backend measures (17+18 simulated, 23 real).

        A TPM reset under a running agent unloads the AK and clears the PCRs: the
        measured launch is gone, so stop with one line instead of retrying forever.
        """
        try:
            return self.tpm.quote(extra, self.tpm.measured_pcrs)
        except TpmError as exc:
            if self.fatal is None:
                self.fatal = (
                    f"the TPM could not quote ({exc}); if it was reset, the measured "
                    "launch is lost: start the agent again"
                )
                logfmt.event(log, "tpm_failed", logging.ERROR, error=self.fatal)
                self.stop()
            raise

    def wrong_server_key(self, server: str, offered: bytes) -> None:
        """A server proved a key other than the pinned one. That is configuration, not
        the network: after a few in a row, stop with one line that says what it
        offered (shown, never trusted)."""
        self.key_mismatches += 1
        if self.key_mismatches < KEY_MISMATCH_LIMIT or self.fatal is not None:
            return
        pinned = self.pinned.hex()
        if offered.hex() == pinned:
            why = (
                "the pinned value is that server's raw public key (server.pub of an older "
                "vcomp), not its fingerprint"
            )
        else:
            why = "check the fingerprint with the organisation"
        self.fatal = (
            f"the server at {server} offered key fingerprint {key_fingerprint(offered).hex()}, "
            f"but this agent pins {pinned} ({why}); stopped after {self.key_mismatches} "
            "tries. Fix server_key in agent.toml or give --server-key."
        )
        logfmt.event(log, "server_key_mismatch", logging.ERROR, server=server, error=self.fatal)
        self.stop()


def join(config: AgentConfig, log_file: Path | None = None) -> None:
    """Run until SIGINT or SIGTERM (``vcomp-agent join``)."""
    logfmt.setup(log_file=log_file)
    faulthandler.enable()  # a crash in a C extension leaves every thread's stack on stderr
    # The default loop, not uvloop: the sandbox forks its launcher from this
    # process, and libuv's state is not safe to use in a forked child (its
    # fd bookkeeping aborts with an assertion). One session per core needs no
    # more speed than asyncio gives.
    asyncio.run(_join(config))


async def _join(config: AgentConfig) -> None:
    runtime = AgentRuntime(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runtime.stop)
    await runtime.run()
