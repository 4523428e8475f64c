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
    ERROR,
    PROGRESS,
    RESULT,
    DomainProtocolError,
    FrameDecoder,
    FrameTooLarge,
    decode_error,
    decode_progress,
    encode_start,
)

TAIL_BYTES = 64 * 1024
READ_CHUNK = 1 << 16
# After a read of the frame pipe that brought PROGRESS and no end, the agent leaves
# the pipe alone this long: a flooding job fills it and blocks in write(2), so the
# job pays for its flood, and the agent reads at most one chunk per pause. The end
# is never later than this: the job's exit drains the pipe at once.
PROGRESS_PAUSE = 0.1


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
    ) -> None:
        self.launch = launch
        self._input = memoryview(encode_start(input_bytes))
        self._decoder = FrameDecoder(limits.output_bytes, coalesce_progress=True)
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
        self._frames_paused: asyncio.TimerHandle | None = None

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
            self._open.add(fd)
        os.set_blocking(lc.in_w, False)
        loop.add_writer(lc.in_w, self._on_writable)

    def detach(self) -> None:
        if self._loop is None:
            return
        self._cancel_frame_pause()
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
        self._resume_frames()  # the end must not wait out a pause
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
            elif frame.type == RESULT:
                self.result = frame.payload
            elif frame.type == ERROR:
                self.error = decode_error(frame.payload)
        if self.result is None and self.error is None and any(f.type == PROGRESS for f in frames):
            self._pause_frames()

    def _pause_frames(self) -> None:
        fd = self.launch.out_r
        if self._loop is None or self._frames_paused is not None or fd not in self._open:
            return
        self._loop.remove_reader(fd)
        self._frames_paused = self._loop.call_later(PROGRESS_PAUSE, self._resume_frames)

    def _resume_frames(self) -> None:
        if self._frames_paused is None:
            return
        self._cancel_frame_pause()
        fd = self.launch.out_r
        if self._loop is not None and fd in self._open:
            self._loop.add_reader(fd, self._guarded, fd, self._on_frames)

    def _cancel_frame_pause(self) -> None:
        if self._frames_paused is not None:
            self._frames_paused.cancel()
            self._frames_paused = None

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
