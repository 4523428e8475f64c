"""The python job payload: bootstrap + shipped guest modules, run by `python -I -S`."""

from __future__ import annotations

import os
import subprocess
import sys

from vcomp.agent.sandbox import pyjob
from vcomp.domain import RESULT, FrameDecoder, encode_start


def run_payload(
    job_code: bytes, data: bytes, *, compiled: bool = False
) -> tuple[int, bytes, bytes]:
    payload = pyjob.build_payload(job_code, pyjob.guest_sources(), [], compiled=compiled)
    memfd = os.memfd_create("payload", 0)
    os.write(memfd, payload)
    os.lseek(memfd, 0, os.SEEK_SET)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()

    def wire() -> None:
        import fcntl

        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (in_r, out_w, memfd)]
        for want, fd in zip((3, 4, 5), high, strict=True):
            os.dup2(fd, want)

    proc = subprocess.Popen(
        pyjob.python_argv(sys.executable),
        preexec_fn=wire,
        close_fds=False,
        env={},
        cwd="/",
        stderr=subprocess.PIPE,
    )
    for fd in (in_r, out_w, memfd):
        os.close(fd)
    os.write(in_w, encode_start(data))
    os.close(in_w)
    out = b""
    while chunk := os.read(out_r, 65536):
        out += chunk
    os.close(out_r)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_guest_modules_come_from_the_payload() -> None:
    code = b"""
import sys
import vcomp.guest
from vcomp.guest import run
assert vcomp.guest.__file__ == "<vcomp-guest:vcomp.guest>", vcomp.guest.__file__
assert "cryptography" not in sys.modules and "site" not in sys.modules
assert sys.flags.isolated and sys.flags.no_site
run(lambda data, progress: data + b"!" + __name__.encode())
"""
    status, out, err = run_payload(code, b"hi")
    assert status == 0, err
    (frame,) = FrameDecoder(100).feed(out)
    assert frame.type == RESULT and frame.payload == b"hi!__main__"


def test_payload_descriptor_is_closed_before_the_job_runs() -> None:
    code = b"""
import os
try:
    os.fstat(5)
    open5 = b"open"
except OSError:
    open5 = b"closed"
from vcomp.guest import run
run(lambda d, p: open5)
"""
    status, out, err = run_payload(code, b"")
    assert status == 0, err
    assert FrameDecoder(100).feed(out)[0].payload == b"closed"


def test_runtime_paths_include_the_interpreter_prefix() -> None:
    paths = pyjob.runtime_paths()
    assert sys.base_prefix in paths
    assert [name for name, _ in pyjob.guest_sources()] == list(pyjob.GUEST_MODULES)


def test_precompiled_guest_modules_work_too() -> None:
    payload_sources = pyjob.precompile(pyjob.guest_sources())
    code = b"from vcomp.guest import run\nrun(lambda d, p: d * 2)\n"
    original = pyjob.guest_sources
    try:
        pyjob.guest_sources = lambda: payload_sources  # type: ignore[assignment]
        status, out, err = run_payload(code, b"ab", compiled=True)
    finally:
        pyjob.guest_sources = original  # type: ignore[assignment]
    assert status == 0, err
    assert FrameDecoder(100).feed(out)[0].payload == b"abab"
