"""The guest SDK, run as a real process speaking fds 3 and 4, outside the sandbox."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap

import pytest

from vcomp.domain import (
    CHECKPOINT,
    ERROR,
    PROGRESS,
    RESULT,
    Frame,
    FrameDecoder,
    decode_progress,
    encode_resume,
    encode_start,
)
from vcomp.guest import EXIT_ERROR, EXIT_NO_MEMORY, EXIT_OK


def run_guest(
    body: str, data: bytes, *, close_input_early: bool = False, before_start: bytes = b""
) -> tuple[int, list[Frame]]:
    code = "from vcomp.guest import run\n" + textwrap.dedent(body)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()

    def wire() -> None:
        # Move the pipe ends to fds 3 and 4 without clobbering each other.
        a = fcntl.fcntl(in_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        preexec_fn=wire,
        close_fds=False,  # fds 3 and 4 are made in preexec_fn; others are non-inheritable
        stderr=subprocess.DEVNULL,
    )
    os.close(in_r)
    os.close(out_w)
    message = before_start + encode_start(data)
    os.write(in_w, message[:3] if close_input_early else message)
    os.close(in_w)
    decoder = FrameDecoder(1 << 20, max_checkpoint=1 << 20)
    frames: list[Frame] = []
    while chunk := os.read(out_r, 65536):
        frames += decoder.feed(chunk)
    os.close(out_r)
    return proc.wait(timeout=30), frames


def test_handler_result_and_progress() -> None:
    status, frames = run_guest(
        """
        def handler(data, progress):
            progress(0.25)
            progress(1.0)
            return data[::-1]
        run(handler)
        """,
        b"abc",
    )
    assert status == EXIT_OK
    assert [f.type for f in frames] == [PROGRESS, PROGRESS, RESULT]
    assert decode_progress(frames[0].payload) == 0.25
    assert frames[-1].payload == b"cba"


def test_exception_becomes_error_frame_and_status_1() -> None:
    status, frames = run_guest(
        """
        def handler(data, progress):
            raise ValueError("bad input " + data.decode())
        run(handler)
        """,
        b"xyz",
    )
    assert status == EXIT_ERROR
    assert frames == [Frame(ERROR, b"ValueError: bad input xyz")]


def test_non_bytes_result_is_an_error() -> None:
    status, frames = run_guest("run(lambda data, progress: 'text')", b"")
    assert status == EXIT_ERROR
    assert frames[0].type == ERROR and b"TypeError" in frames[0].payload


def test_memory_error_has_its_own_status() -> None:
    status, frames = run_guest(
        """
        def handler(data, progress):
            raise MemoryError()
        run(handler)
        """,
        b"",
    )
    assert status == EXIT_NO_MEMORY
    assert frames[0].type == ERROR


def test_truncated_start_is_reported() -> None:
    status, frames = run_guest("run(lambda d, p: d)", b"hello", close_input_early=True)
    assert status == EXIT_ERROR
    assert b"START" in frames[0].payload


@pytest.mark.parametrize("size", [0, 1, 200_000])
def test_input_sizes(size: int) -> None:
    status, frames = run_guest("run(lambda d, p: str(len(d)).encode())", b"z" * size)
    assert status == EXIT_OK
    assert frames[-1].payload == str(size).encode()


RESUMER = """
    from vcomp.guest import checkpoint, resume_state
    def handler(data, progress):
        state = resume_state()
        start = 0 if state is None else int(state)
        for i in range(start, 5):
            checkpoint(str(i + 1).encode())
        return b"from %d" % start
    run(handler)
    """


def test_checkpoint_frames_and_no_resume_state_on_a_fresh_start() -> None:
    status, frames = run_guest(RESUMER, b"")
    assert status == EXIT_OK
    assert [f.payload for f in frames if f.type == CHECKPOINT] == [b"1", b"2", b"3", b"4", b"5"]
    assert frames[-1] == Frame(RESULT, b"from 0")


def test_resume_state_is_the_resume_frame_before_start() -> None:
    status, frames = run_guest(RESUMER, b"", before_start=encode_resume(b"3"))
    assert status == EXIT_OK
    assert [f.payload for f in frames if f.type == CHECKPOINT] == [b"4", b"5"]
    assert frames[-1] == Frame(RESULT, b"from 3")


def test_two_resume_frames_are_a_protocol_error() -> None:
    status, frames = run_guest(RESUMER, b"", before_start=encode_resume(b"1") + encode_resume(b"2"))
    assert status == EXIT_ERROR
    assert frames[-1].type == ERROR and b"more than one RESUME" in frames[-1].payload


def test_checkpoint_of_a_non_bytes_state_is_an_error() -> None:
    status, frames = run_guest(
        """
        from vcomp.guest import checkpoint
        run(lambda data, progress: checkpoint("text") or b"")
        """,
        b"",
    )
    assert status == EXIT_ERROR
    assert frames == [Frame(ERROR, b"TypeError: checkpoint state must be bytes, not str")]


def test_checkpoint_outside_run_does_nothing() -> None:
    """A handler called directly (a test, a local run) may checkpoint harmlessly."""
    code = (
        "import os\n"
        "from vcomp.guest import checkpoint, resume_state\n"
        "checkpoint(b'state')\n"
        "assert resume_state() is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert done.stdout == b"ok\n", done.stderr


@pytest.mark.parametrize(
    "body",
    [
        "run(lambda data: data.upper())",
        "def handler(data):\n    return data.upper()\nrun(handler)",
        "import functools\nrun(functools.partial(lambda suffix, data: data.upper() + suffix, b''))",
        "class Job:\n    def __call__(self, data):\n        return data.upper()\nrun(Job())",
        "class Job:\n    def go(self, data):\n        return data.upper()\nrun(Job().go)",
    ],
    ids=["lambda", "function", "partial", "callable_object", "bound_method"],
)
def test_one_argument_handler_gets_only_the_input(body: str) -> None:
    status, frames = run_guest(body, b"abc")
    assert status == EXIT_OK, frames
    assert frames == [Frame(RESULT, b"ABC")]


@pytest.mark.parametrize(
    "body",
    [
        "def handler(data, progress=None):\n    progress(0.5)\n    return data\nrun(handler)",
        "def handler(*args):\n    args[1](0.5)\n    return args[0]\nrun(handler)",
        "class Job:\n    def go(self, data, progress):\n        progress(0.5)\n"
        "        return data\nrun(Job().go)",
    ],
    ids=["optional_progress", "varargs", "bound_method"],
)
def test_handler_that_can_take_progress_gets_it(body: str) -> None:
    status, frames = run_guest(body, b"abc")
    assert status == EXIT_OK, frames
    assert [f.type for f in frames] == [PROGRESS, RESULT]


@pytest.mark.parametrize(
    "body",
    [
        "run(lambda: b'')",
        "run(lambda data, progress, extra: b'')",
        "def handler(data, *, key):\n    return data\nrun(handler)",
        "run(42)",
    ],
    ids=["no_args", "three_args", "required_keyword", "not_callable"],
)
def test_incompatible_handler_is_a_clear_error(body: str) -> None:
    status, frames = run_guest(body, b"abc")
    assert status == EXIT_ERROR
    assert len(frames) == 1 and frames[0].type == ERROR
    assert b"handler must take (data) or (data, progress)" in frames[0].payload, frames


def test_progress_takes_any_real_number_and_refuses_nan() -> None:
    """domain.md 8.2: progress() converts with float() (an int or a bool works), clamps,
    and a NaN fails the job with one ERROR frame, as any exception in the handler."""
    status, frames = run_guest(
        """
        def handler(data, progress):
            progress(1)
            progress(-3)
            progress(True)
            progress(float("nan"))
            return b"never"
        run(handler)
        """,
        b"",
    )
    assert status == EXIT_ERROR
    assert [int.from_bytes(f.payload, "big") for f in frames[:3]] == [1_000_000, 0, 1_000_000]
    assert frames[3:] == [Frame(ERROR, b"DomainProtocolError: progress fraction is NaN")]


def test_a_handler_that_exits_still_sends_one_error_frame() -> None:
    """SystemExit is caught like any exception: the agent always gets RESULT or ERROR."""
    status, frames = run_guest(
        """
        import sys
        def handler(data):
            sys.exit(0)
        run(handler)
        """,
        b"",
    )
    assert status == EXIT_ERROR
    assert frames == [Frame(ERROR, b"SystemExit: 0")]
