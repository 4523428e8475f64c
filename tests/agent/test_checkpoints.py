"""The agent's side of checkpoints (vcomp.agent.checkpoints) on a real sealed spool.

The flood and oversize attacks through the real sandbox are in
tests/agent/sandbox/test_escapes.py; the SIGKILL-and-resume path in
tests/integration/test_checkpoint_resume.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vcomp.agent.checkpoints import (
    JobCheckpoints,
    interrupted_attempts,
    job_binding,
    sweep_stale,
)
from vcomp.agent.spool import ResultSpool, SpooledResult
from vcomp.agent.tpm import SimulatedTpm


@pytest.fixture
def spool(tmp_path: Path) -> ResultSpool:
    return ResultSpool(tmp_path / "spool", SimulatedTpm.open(tmp_path / "tpm"))


def test_binding_separates_kind_code_and_input() -> None:
    assert job_binding("python", b"ab", b"c") != job_binding("python", b"a", b"bc")
    assert job_binding("python", b"x", b"y") != job_binding("exec", b"x", b"y")
    assert job_binding("exec", b"x", b"y") == job_binding("exec", b"x", b"y")


async def test_first_checkpoint_is_written_at_once_and_later_ones_are_coalesced(
    spool: ResultSpool,
) -> None:
    binding = job_binding("python", b"code", b"input")
    jc = JobCheckpoints(spool, 4, 1, binding, max_bytes=1024)
    assert jc.resume() is None
    jc.keep(b"state 0")
    await jc.settled()
    assert (jc.received, jc.written) == (1, 1)
    assert spool.checkpoint(4, binding, 1024) == b"state 0"
    for i in range(1, 50):
        jc.keep(b"state %d" % i)
    await jc.settled()  # the interval's timer writes the latest one only
    assert (jc.received, jc.written) == (50, 2)
    assert spool.checkpoint(4, binding, 1024) == b"state 49"
    await jc.close()
    jc.keep(b"after the end")  # ignored
    assert spool.checkpoint(4, binding, 1024) == b"state 49"
    again = JobCheckpoints(spool, 4, 2, binding, max_bytes=1024)
    assert again.resume() == b"state 49"


async def test_a_tampered_checkpoint_is_not_used(spool: ResultSpool) -> None:
    binding = job_binding("exec", b"code", b"input")
    jc = JobCheckpoints(spool, 6, 1, binding)
    jc.keep(b"good state")
    await jc.close()
    path = spool.directory / "6-1.checkpoint"
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0x40
    path.write_bytes(bytes(blob))
    assert JobCheckpoints(spool, 6, 2, binding).resume() is None
    assert not path.exists()


def test_interrupted_attempts_are_those_without_a_result(spool: ResultSpool) -> None:
    binding = b"\0" * 32
    spool.put_checkpoint(1, 3, binding, b"a")
    spool.put_checkpoint(2, 1, binding, b"b")
    spool.put(SpooledResult(2, 1, "ok", "", 1, 1, b"out"))
    assert interrupted_attempts(spool) == [(1, 3)]


def test_sweep_removes_only_old_checkpoints(spool: ResultSpool) -> None:
    spool.put_checkpoint(1, 1, b"", b"old")
    spool.put_checkpoint(2, 1, b"", b"new")
    old = time.time() - 8 * 24 * 3600
    os.utime(spool.directory / "1-1.checkpoint", (old, old))
    assert sweep_stale(spool) == 1
    assert spool.checkpoint_holdings() == [(2, 1)]
