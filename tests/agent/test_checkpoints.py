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

from vcomp.agent import checkpoints
from vcomp.agent.checkpoints import (
    UPLOAD_INTERVAL,
    JobCheckpoints,
    Resume,
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
    resume = again.resume()
    assert resume is not None and (resume.state, resume.source) == (b"state 49", "spool")


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


async def test_the_later_attempts_state_wins_between_own_and_uploaded(
    spool: ResultSpool,
) -> None:
    binding = job_binding("python", b"code", b"input")
    spool.put_checkpoint(8, 2, binding, b"own, attempt 2")
    jc = JobCheckpoints(spool, 8, 5, binding, max_bytes=64)
    older, newer = jc.resume(b"uploaded by attempt 1", 1), jc.resume(b"uploaded by 4", 4)
    assert older == Resume(b"own, attempt 2", "spool", 2)
    assert newer == Resume(b"uploaded by 4", "server", 4)
    # Over this agent's bound: not used (the job would refuse a RESUME that large).
    assert jc.resume(b"x" * 65, 4) == Resume(b"own, attempt 2", "spool", 2)
    spool.remove_checkpoint(8)
    assert jc.resume(b"x" * 65, 4) is None
    assert jc.resume(b"only the upload", 3) == Resume(b"only the upload", "server", 3)


async def test_uploads_go_at_most_once_per_interval_and_only_when_taken(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []
    taking = [False]

    def upload(state: bytes) -> bool:
        if taking[0]:
            sent.append(state)
        return taking[0]

    clock = [1000.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    jc = JobCheckpoints(spool, 9, 1, b"\0" * 32, upload=upload)
    jc.keep(b"no session yet")  # not taken: tried again at the next checkpoint
    taking[0] = True
    jc.keep(b"first")
    clock[0] += UPLOAD_INTERVAL - 1
    jc.keep(b"too soon")
    clock[0] += 1
    jc.keep(b"second")
    await jc.close()
    assert sent == [b"first", b"second"] and jc.uploaded == 2


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
