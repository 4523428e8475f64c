"""The guest SDK: write a vcomp job in Python (spec: protocol/spec/domain.md).

    from vcomp.guest import run

    def handler(data: bytes, progress) -> bytes:
        progress(0.5)
        return data.upper()

    run(handler)

A handler that needs no progress reports may take only the input: ``handler(data)``.

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
import types

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
    Handler = Callable[[bytes, Progress], bytes] | Callable[[bytes], bytes]

_VARARGS = 0x04  # inspect.CO_VARARGS, without importing inspect
_UNBOUNDED = float("inf")


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
        wants_progress = takes_progress(handler)
        data = read_start(in_fd)

        def progress(fraction: float) -> None:
            write_all(out_fd, encode_progress(float(fraction)))

        output = handler(data, progress) if wants_progress else handler(data)  # type: ignore[call-arg]
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


def takes_progress(handler: object) -> bool:
    """True for ``handler(data, progress)``, False for ``handler(data)``; TypeError otherwise.

    Asked once, before the input is read, so a wrong handler fails as one clear ERROR.
    """
    if callable(handler):
        arity = _positional_arity(handler)
        if arity is None:  # no readable signature (some builtins): the full form
            return True
        required, most = arity
        for n in (2, 1):
            if required <= n <= most:
                return n == 2
    raise TypeError(f"handler must take (data) or (data, progress), not {handler!r}")


def _positional_arity(handler: Callable[..., object]) -> tuple[float, float] | None:
    """(required, maximum) positional arguments; a required keyword-only one makes it
    uncallable. Plain functions and methods are read from their code object: importing
    inspect would cost ~9 ms at every job start."""
    required: float
    func, bound = handler, 0
    if isinstance(func, types.MethodType):
        func, bound = func.__func__, 1
    if isinstance(func, types.FunctionType):
        code = func.__code__
        most = _UNBOUNDED if code.co_flags & _VARARGS else code.co_argcount - bound
        required = code.co_argcount - bound - len(func.__defaults__ or ())
        if code.co_kwonlyargcount > len(func.__kwdefaults__ or {}):
            required = _UNBOUNDED
        return required, most
    import inspect

    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        required = _UNBOUNDED
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    return required, _UNBOUNDED if varargs else len(positional)


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
