"""A running job's checkpoints on this agent: the state it resumes from, and the latest
state it saved, kept sealed in the spool (spec: protocol/spec/domain.md, "Checkpoints").

Only the latest checkpoint of a job is kept, written at most once per
WRITE_INTERVAL (a job that floods CHECKPOINT frames costs one fsync a second and
one state in memory). A job that comes back to this agent (the same job id with the
same code and input) resumes from it. After the agent was SIGKILLed or the machine
rebooted, the agent reports each attempt it holds a checkpoint of as lost (JOB_LOST) at
its first session, so the server requeues the job at once instead of at lease expiry,
and hands it out again, normally to this agent, which is asking for work. The file
goes when the job's result is committed or refused, when the server aborts the job,
or after MAX_AGE_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vcomp import logfmt
from vcomp.agent.sandbox import Checkpointing
from vcomp.agent.spool import CHECKPOINT_SUFFIX, ResultSpool, SpoolError
from vcomp.domain import DEFAULT_MAX_CHECKPOINT
from vcomp.errors import loggable

log = logging.getLogger("vcomp.agent")

WRITE_INTERVAL = 1.0
UPLOAD_INTERVAL = 10.0  # to the server, when it asks for them: a state every 10 s at most
MAX_AGE_SECONDS = 7 * 24 * 3600  # a job not seen again in a week went elsewhere


def job_binding(kind: str, code: bytes, data: bytes) -> bytes:
    """What a checkpoint belongs to: the job's kind, code and input."""
    h = hashlib.sha256()
    for part in (kind.encode(), code, data):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


class JobCheckpoints:
    """One job's checkpoints for one run in the sandbox."""

    def __init__(
        self,
        spool: ResultSpool,
        job: int,
        attempt: int,
        binding: bytes,
        max_bytes: int = DEFAULT_MAX_CHECKPOINT,
        upload: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.spool = spool
        self._upload = upload  # hands a state to the session; False: not sent
        self._uploaded_at = -UPLOAD_INTERVAL
        self.uploaded = 0
        self.job = job
        self.attempt = attempt
        self.binding = binding
        self.max_bytes = max_bytes
        self.received = 0
        self.written = 0
        self._pending: bytes | None = None
        self._last_write = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None
        self._closed = False

    def resume(self, uploaded: bytes | None = None, uploaded_attempt: int = 0) -> Resume | None:
        """The state to resume from: this agent's own, or the one the server sent
        (another agent's upload), whichever an attempt wrote later."""
        own = self._own()
        if uploaded is not None and len(uploaded) > self.max_bytes:
            logfmt.event(
                log,
                "checkpoint_unusable",
                logging.WARNING,
                job=self.job,
                error=f"the server's is {len(uploaded)} bytes, over {self.max_bytes}",
            )
            uploaded = None
        if own is not None and (uploaded is None or own[0] >= uploaded_attempt):
            return Resume(own[1], "spool", own[0])
        if uploaded is not None:
            return Resume(uploaded, "server", uploaded_attempt)
        return None

    def _own(self) -> tuple[int, bytes] | None:
        try:
            return self.spool.checkpoint_of(self.job, self.binding, self.max_bytes)
        except (SpoolError, OSError) as exc:
            logfmt.event(
                log, "checkpoint_unusable", logging.WARNING, job=self.job, error=loggable(exc)
            )
            return None

    def sandbox_side(self, resume: bytes | None) -> Checkpointing:
        return Checkpointing(resume=resume, on_checkpoint=self.keep, max_bytes=self.max_bytes)

    def keep(self, state: bytes) -> None:
        """A CHECKPOINT from the job: written now, or when the interval is over."""
        if self._closed:
            return
        self.received += 1
        self._pending = state  # a later one replaces one not yet written
        self._schedule()
        now = time.monotonic()
        due = self._upload is not None and now >= self._uploaded_at + UPLOAD_INTERVAL
        if due and self._upload is not None and self._upload(state):
            self._uploaded_at = now
            self.uploaded += 1

    def _schedule(self) -> None:
        if self._writing is not None or self._timer is not None:
            return  # the write in flight, or the timer, takes the pending state
        wait = self._last_write + WRITE_INTERVAL - time.monotonic()
        if wait <= 0:
            self._start_write()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._start_write)

    def _start_write(self) -> None:
        self._timer = None
        state, self._pending = self._pending, None
        if state is None or self._closed:
            return
        self._last_write = time.monotonic()
        # Off the event loop: an fsync of megabytes must not stall the other workers.
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, state))
        self._writing.add_done_callback(self._written)

    def _write(self, state: bytes) -> None:
        try:
            self.spool.put_checkpoint(self.job, self.attempt, self.binding, state)
            self.written += 1
        except Exception as exc:  # the job goes on; only this checkpoint is not kept
            logfmt.event(
                log, "checkpoint_write_failed", logging.ERROR, job=self.job, error=loggable(exc)
            )

    def _written(self, _done: asyncio.Future[None]) -> None:
        self._writing = None
        if self._pending is not None and not self._closed:
            self._schedule()

    async def settled(self) -> None:
        """Until no write is in flight and none is due (for tests and for close)."""
        while self._writing is not None or self._timer is not None:
            if self._writing is not None:
                await asyncio.shield(self._writing)
            else:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        """The run ended: no more writes, and the one in flight has landed, so a later
        removal (the result committed) cannot be overtaken by it."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)


@dataclass(frozen=True, slots=True)
class Resume:
    """A state to resume from, where it came from, and the attempt that wrote it."""

    state: bytes
    source: str  # "spool" (this agent's) or "server" (uploaded by an earlier attempt)
    attempt: int


def interrupted_attempts(spool: ResultSpool) -> list[tuple[int, int]]:
    """The attempts a killed run of this agent left checkpoints of and no result."""
    return [
        (job, attempt)
        for job, attempt in spool.checkpoint_holdings()
        if not spool.has(job, attempt)
    ]


def sweep_stale(spool: ResultSpool, max_age: float = MAX_AGE_SECONDS) -> int:
    """Remove checkpoints older than ``max_age``; returns how many went."""
    now = time.time()
    removed = 0
    for path in spool.directory.glob("*" + CHECKPOINT_SUFFIX):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > max_age:
                path.unlink()
                removed += 1
    return removed
