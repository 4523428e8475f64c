"""The agent's pipes to one running job: START in; frames, logs, setup lines and status out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from vcomp.agent.sandbox.launch import Launch
from vcomp.agent.sandbox.outcome import OutcomeKind
from vcomp.agent.sandbox.policy import JobLimits
from vcomp.agent.sandbox.tree import JobTree
from vcomp.domain import (
    CHECKPOINT,
    DEFAULT_MAX_CHECKPOINT,
    ERROR,
    PROGRESS,
    RESULT,
    DomainProtocolError,
    FrameDecoder,
    FrameTooLarge,
    decode_error,
    decode_progress,
    encode_resume,
    encode_start,
)

TAIL_BYTES = 64 * 1024
READ_CHUNK = 1 << 16
# After a read that brought no end (RESULT or ERROR), the agent leaves that pipe alone
# this long if the read was small or brought PROGRESS: a job that dribbles bytes or
# floods PROGRESS fills the pipe and blocks in write(2), so the job pays for its
# output and the agent reads at most one chunk per pause per pipe. A large result
# arrives in full reads and is not slowed; an end is never later than one pause,
# and the job's exit drains every pipe at once.
PROGRESS_PAUSE = 0.1
# A read this short costs the agent more per byte than the job: pause after it.
SMALL_READ = 4096


@dataclass(frozen=True, slots=True)
class Checkpointing:
    """A job's checkpoints: the state it resumes from, and where new ones go.

    ``on_checkpoint`` gets each CHECKPOINT payload (at most ``max_bytes``; a larger
    one ends the job as OUTPUT_TOO_LARGE before it is buffered).
    """

    resume: bytes | None = None
    on_checkpoint: Callable[[bytes], None] | None = None
    max_bytes: int = DEFAULT_MAX_CHECKPOINT


@dataclass(frozen=True, slots=True)
class JobStatus:
    wait_status: int
    user_seconds: float
    system_seconds: float
    maxrss_kib: int


class _Capture:
    """stdout or stderr: counts everything, keeps a bounded tail."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.tail = bytearray()

    def add(self, data: bytes) -> bool:
        """Keep ``data``; False once the stream went past its cap."""
        self.total += len(data)
        self.tail += data
        if len(self.tail) > TAIL_BYTES:
            del self.tail[: len(self.tail) - TAIL_BYTES]
        return self.total <= self.limit


class JobIO:
    """Feeds START to the job and reads its frames, logs, setup report and status."""

    def __init__(
        self,
        launch: Launch,
        input_bytes: bytes,
        limits: JobLimits,
        on_progress: Callable[[float], None] | None,
        clock: Callable[[], float],
        checkpoints: Checkpointing | None = None,
    ) -> None:
        self.launch = launch
        ck = checkpoints or Checkpointing()
        resume = b"" if ck.resume is None else encode_resume(ck.resume)
        self._input = memoryview(resume + encode_start(input_bytes))
        self._decoder = FrameDecoder(
            limits.output_bytes, coalesce_progress=True, max_checkpoint=ck.max_bytes
        )
        self._on_checkpoint = ck.on_checkpoint
        self.checkpoints = 0
        self._on_progress = on_progress
        self._clock = clock
        self.last_frame_at = clock()
        self.result: bytes | None = None
        self.error: str | None = None
        self.progress: float | None = None
        self.violation: tuple[OutcomeKind, str] | None = None
        self.job_pid: int | None = None
        self.job_status: JobStatus | None = None
        self.setup_failure: str | None = None
        self.setup_done = False
        self.stdout = _Capture(limits.log_bytes)
        self.stderr = _Capture(limits.log_bytes)
        self._setup = bytearray()
        self._status = bytearray()
        self._open: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None
        self._handlers: dict[int, Callable[[bytes], None]] = {}
        self._paused: dict[int, asyncio.TimerHandle] = {}
        self._progress_seen = False

    # --- event loop wiring ------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        lc = self.launch
        for fd, handler in (
            (lc.out_r, self._on_frames),
            (lc.so_r, self._on_stdout),
            (lc.se_r, self._on_stderr),
            (lc.setup_r, self._on_setup),
            (lc.status_r, self._on_status),
        ):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._guarded, fd, handler)
            self._handlers[fd] = handler
            self._open.add(fd)
        os.set_blocking(lc.in_w, False)
        loop.add_writer(lc.in_w, self._on_writable)

    def detach(self) -> None:
        if self._loop is None:
            return
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        for fd in list(self._open):
            self._loop.remove_reader(fd)
        self._open.clear()
        if self.launch.in_w >= 0:
            self._loop.remove_writer(self.launch.in_w)
            self._close_input()

    async def wait(self, timeout: float) -> None:
        """Until something arrives or ``timeout`` passes.

        Not asyncio.wait_for: on 3.11 it can swallow a cancellation that races with the
        inner wait completing, and cancellation (RESET) must always get through.
        """
        if not self._event.is_set() and timeout > 0 and self._loop is not None:
            waiter = self._loop.create_future()
            self._waiter = waiter
            timer = self._loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        self._event.clear()

    async def finish(self, tree: JobTree, grace: float) -> None:
        """After a kill or the job's exit: drain the pipes until every writer is gone."""
        self._resume_all()  # the end must not wait out a pause
        deadline = time.monotonic() + grace
        while self._open and time.monotonic() < deadline:
            tree.kill()
            await self.wait(0.02)
        self.detach()

    # --- readers ------------------------------------------------------------------------

    def _guarded(self, fd: int, handler: Callable[[bytes], None]) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self._loop is not None:
                self._loop.remove_reader(fd)
            self._open.discard(fd)
            if fd == self.launch.setup_r:
                self.setup_done = True
            if fd == self.launch.out_r and self._decoder.pending and self.violation is None:
                self.violation = (
                    OutcomeKind.PROTOCOL_VIOLATION,
                    "truncated frame at end of output",
                )
        else:
            handler(data)
            if self._pauses_after(fd, data):
                self._pause(fd)
        self._event.set()
        if self._waiter is not None:
            _wake(self._waiter)

    def _on_frames(self, data: bytes) -> None:
        if self.violation is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            self.violation = (OutcomeKind.OUTPUT_TOO_LARGE, str(exc))
            return
        except DomainProtocolError as exc:
            self.violation = (OutcomeKind.PROTOCOL_VIOLATION, str(exc))
            return
        for frame in frames:
            self.last_frame_at = self._clock()
            if self.result is not None or self.error is not None:
                self.violation = (OutcomeKind.PROTOCOL_VIOLATION, f"{frame.name} after the end")
                return
            if frame.type == PROGRESS:
                self.progress = decode_progress(frame.payload)
                if self._on_progress is not None:
                    with contextlib.suppress(Exception):
                        self._on_progress(self.progress)
            elif frame.type == CHECKPOINT:
                self.checkpoints += 1
                if self._on_checkpoint is not None:
                    with contextlib.suppress(Exception):
                        self._on_checkpoint(frame.payload)
            elif frame.type == RESULT:
                self.result = frame.payload
            elif frame.type == ERROR:
                self.error = decode_error(frame.payload)
        if any(f.type == PROGRESS for f in frames):
            self._progress_seen = True

    def _pauses_after(self, fd: int, data: bytes) -> bool:
        """Whether this read was cheap for the job and dear for the agent."""
        if self.result is not None or self.error is not None or self.violation is not None:
            return False  # the end: drain at once
        progress, self._progress_seen = self._progress_seen, False
        job_writes = fd in (self.launch.out_r, self.launch.so_r, self.launch.se_r)
        return job_writes and (progress or len(data) < SMALL_READ)

    def _pause(self, fd: int) -> None:
        if self._loop is None or fd in self._paused or fd not in self._open:
            return
        self._loop.remove_reader(fd)
        self._paused[fd] = self._loop.call_later(PROGRESS_PAUSE, self._resume, fd)

    def _resume(self, fd: int) -> None:
        timer = self._paused.pop(fd, None)
        if timer is None:
            return
        timer.cancel()
        if self._loop is not None and fd in self._open:
            self._loop.add_reader(fd, self._guarded, fd, self._handlers[fd])

    def _resume_all(self) -> None:
        for fd in list(self._paused):
            self._resume(fd)

    def _on_stdout(self, data: bytes) -> None:
        if not self.stdout.add(data) and self.violation is None:
            self.violation = (OutcomeKind.OUTPUT_TOO_LARGE, f"stdout over {self.stdout.limit}")

    def _on_stderr(self, data: bytes) -> None:
        if not self.stderr.add(data) and self.violation is None:
            self.violation = (OutcomeKind.OUTPUT_TOO_LARGE, f"stderr over {self.stderr.limit}")

    def _on_setup(self, data: bytes) -> None:
        self._setup += data[: max(0, 65536 - len(self._setup))]
        for line in self._setup.decode("utf-8", "replace").splitlines():
            if line.startswith("F "):
                self.setup_failure = line[2:]

    def _on_status(self, data: bytes) -> None:
        self._status += data
        *lines, rest = bytes(self._status).split(b"\n")
        self._status = bytearray(rest)
        for raw in lines:
            parts = raw.decode("ascii", "replace").split()
            if parts[:1] == ["J"] and len(parts) == 2:
                self.job_pid = int(parts[1])
            elif parts[:1] == ["X"] and len(parts) == 5:
                self.job_status = JobStatus(
                    int(parts[1]), float(parts[2]), float(parts[3]), int(parts[4])
                )

    def _on_writable(self) -> None:
        try:
            while self._input:
                self._input = self._input[os.write(self.launch.in_w, self._input) :]
        except BlockingIOError:
            return
        except OSError:
            pass  # the job closed its input early: its business
        if self._loop is not None:
            self._loop.remove_writer(self.launch.in_w)
        self._close_input()

    def _close_input(self) -> None:
        if self.launch.in_w >= 0:
            with contextlib.suppress(OSError):
                os.close(self.launch.in_w)
            self.launch.in_w = -1

    def setup_text(self) -> str:
        return self._setup.decode("utf-8", "replace")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
