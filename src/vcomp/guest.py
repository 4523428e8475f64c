"""The guest SDK: write a vcomp job in Python (spec: protocol/spec/domain.md).

    from vcomp.guest import run

    def handler(data: bytes, progress) -> bytes:
        progress(0.5)
        return data.upper()

    run(handler)

A long job saves its state now and then with ``checkpoint(state)``; when the agent
restarts it (after a crash, a reboot or on another agent), ``resume_state()`` returns
the last state saved, else None.

The job reads an optional RESUME frame and one START frame on fd 3 and writes
PROGRESS and CHECKPOINT frames and one RESULT (or ERROR) frame on fd 4. stdout and
stderr are free for logs; the agent keeps a bounded tail of them. Exit status: 0
after RESULT, 1 after ERROR, 12 when memory ran out.

Standard library only (plus vcomp.domain, which is too), so it runs in the sandbox.
It is imported at every job start, so it keeps its imports cheap: no typing at run
time, traceback only when a handler fails.
"""

from __future__ import annotations

import os
import sys

from vcomp.domain import (
    AGENT_FRAME_TYPES,
    MAX_PAYLOAD,
    RESUME,
    START,
    DomainProtocolError,
    FrameDecoder,
    encode_checkpoint,
    encode_error,
    encode_progress,
    encode_result,
)

IN_FD = 3
OUT_FD = 4
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_MEMORY = 12  # ENOMEM: the job detected that an allocation failed

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~5 ms per job
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    Progress = Callable[[float], None]
    Handler = Callable[[bytes, Progress], bytes]


_resume: bytes | None = None
_out_fd: int | None = None  # set by run(): outside it (a handler called directly) no-op


def read_start(fd: int = IN_FD) -> bytes:
    """Read fd until one complete START frame has arrived; return its payload.

    A RESUME frame before it is kept for :func:`resume_state`.
    """
    global _resume
    decoder = FrameDecoder(MAX_PAYLOAD, allowed=AGENT_FRAME_TYPES)
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise DomainProtocolError("input closed before a complete START frame")
        for frame in decoder.feed(chunk):
            if frame.type == RESUME:
                if _resume is not None:
                    raise DomainProtocolError("more than one RESUME frame")
                _resume = frame.payload
            elif frame.type == START:
                return frame.payload


def resume_state() -> bytes | None:
    """The state of this job's last :func:`checkpoint` before a restart, else None."""
    return _resume


def checkpoint(state: bytes) -> None:
    """Save ``state`` (bytes, at most the agent's checkpoint bound) to resume from.

    Only the latest checkpoint is kept. A state over the bound ends the job with an
    error, so keep it small: counters and seeds, not data. Outside :func:`run` (a
    handler called directly, e.g. in a test) it does nothing.
    """
    if not isinstance(state, bytes | bytearray | memoryview):
        raise TypeError(f"checkpoint state must be bytes, not {type(state).__name__}")
    if _out_fd is not None:
        write_all(_out_fd, encode_checkpoint(bytes(state)))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def run(handler: Handler, *, in_fd: int = IN_FD, out_fd: int = OUT_FD) -> NoReturn:
    """Run ``handler`` on the job's input and send its result; never returns."""
    global _out_fd
    _out_fd = out_fd
    status = EXIT_OK
    try:
        data = read_start(in_fd)

        def progress(fraction: float) -> None:
            write_all(out_fd, encode_progress(float(fraction)))

        output = handler(data, progress)
        if not isinstance(output, bytes | bytearray | memoryview):
            raise TypeError(f"handler must return bytes, not {type(output).__name__}")
        write_all(out_fd, encode_result(bytes(output)))
    except MemoryError:
        status = _report_failure(out_fd, "MemoryError: the job ran out of memory", EXIT_NO_MEMORY)
    except BaseException as exc:  # every failure must reach the agent as an ERROR frame
        import traceback

        traceback.print_exc(file=sys.stderr)
        text = f"{type(exc).__name__}: {exc}"
        status = _report_failure(out_fd, text, EXIT_ERROR)
    _flush_logs()
    os._exit(status)


def _report_failure(out_fd: int, text: str, status: int) -> int:
    # Not contextlib.suppress: importing contextlib costs milliseconds at every job start.
    try:  # noqa: SIM105
        write_all(out_fd, encode_error(text))
    except OSError:
        pass
    return status


def _flush_logs() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105
            stream.flush()
        except (OSError, ValueError):
            pass
