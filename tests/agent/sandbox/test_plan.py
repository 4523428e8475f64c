"""A JobSpec handed to a prepared launcher arrives whole, descriptors included."""

from __future__ import annotations

import os
import socket

from vcomp.agent.sandbox.plan import MAX_SPEC_BYTES, JobSpec
from vcomp.agent.sandbox.policy import JobLimits


def test_job_spec_survives_the_control_socket() -> None:
    pipes = [os.pipe() for _ in range(6)]
    limits = JobLimits(cpu_seconds=3, memory_bytes=1 << 28, wall_seconds=9, output_bytes=100)
    spec = JobSpec(
        argv=("python3", "-I"),
        exec_path="/usr/bin/python3",
        env={"PATH": "/usr/bin", "HOME": "/job"},
        limits=limits,
        job_in=pipes[0][0],
        job_out=pipes[1][1],
        job_stdout=pipes[2][1],
        job_stderr=pipes[3][1],
        workdir_fd=pipes[4][0],
        workdir_path="/job",
        payload_fd=pipes[5][0],
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[int] = []
    try:
        data, fds = spec.to_message()
        socket.send_fds(ours, [data], fds)
        raw, received, _flags, _addr = socket.recv_fds(theirs, MAX_SPEC_BYTES, 8)
        got = JobSpec.from_message(raw, received)
        assert (got.argv, got.exec_path, got.env, got.limits, got.workdir_path) == (
            spec.argv,
            spec.exec_path,
            spec.env,
            spec.limits,
            spec.workdir_path,
        )
        assert got.code_fd is None and got.payload_fd is not None
        # The received descriptors are the same pipes: what goes in one end comes out.
        os.write(pipes[0][1], b"in")
        assert os.read(got.job_in, 2) == b"in"
        os.write(got.job_out, b"out")
        assert os.read(pipes[1][0], 3) == b"out"
        os.write(pipes[5][1], b"payload")
        assert os.read(got.payload_fd, 7) == b"payload"
    finally:
        ours.close()
        theirs.close()
        for fd in [*received, *(fd for pair in pipes for fd in pair)]:
            os.close(fd)
