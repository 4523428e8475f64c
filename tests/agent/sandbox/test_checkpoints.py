"""Checkpoints through the real sandbox: RESUME in, CHECKPOINT frames out, bounded."""

from __future__ import annotations

import json

from vcomp.agent.sandbox import Checkpointing, OutcomeKind, Sandbox

from .conftest import EXAMPLES, LIMITS, assert_still_works

PI_PY = (EXAMPLES / "pi.py").read_bytes()
PI_INPUT = b'{"points": 200000, "seed": 11, "report_resume": true}'


async def _resumed_equals_uninterrupted(sandbox: Sandbox, kind: str, code: bytes) -> None:
    states: list[bytes] = []
    full = await sandbox.run(
        kind=kind,  # type: ignore[arg-type]
        code=code,
        input=PI_INPUT,
        limits=LIMITS,
        checkpoints=Checkpointing(on_checkpoint=states.append),
    )
    assert full.kind is OutcomeKind.OK, full
    uninterrupted = json.loads(full.result or b"")
    assert "resumed_at" not in uninterrupted
    assert len(states) >= 50
    middle = states[len(states) // 2]
    resumed = await sandbox.run(
        kind=kind,  # type: ignore[arg-type]
        code=code,
        input=PI_INPUT,
        limits=LIMITS,
        checkpoints=Checkpointing(resume=middle),
    )
    assert resumed.kind is OutcomeKind.OK, resumed
    answer = json.loads(resumed.result or b"")
    done_at_checkpoint = int(middle.split()[0]) if kind == "exec" else json.loads(middle)["done"]
    # It did not start from zero, and it ends with exactly the uninterrupted counts.
    assert answer.pop("resumed_at") == done_at_checkpoint > 0
    assert answer == uninterrupted


async def test_pi_py_resumes_exactly(sandbox: Sandbox) -> None:
    await _resumed_equals_uninterrupted(sandbox, "python", PI_PY)


async def test_pi_c_resumes_exactly(sandbox: Sandbox, pi_binary: bytes) -> None:
    await _resumed_equals_uninterrupted(sandbox, "exec", pi_binary)


async def test_oversized_checkpoint_ends_the_job_before_it_is_buffered(sandbox: Sandbox) -> None:
    """A hostile job declares a 4 GiB checkpoint: the job fails, the agent buffers nothing."""
    code = (
        b"import os\n"
        b"os.read(3, 1 << 16)\n"
        b"os.write(4, b'\\x05\\xff\\xff\\xff\\xff' + b'x' * 60000)\n"
        b"import time; time.sleep(30)\n"
    )
    kept: list[bytes] = []
    outcome = await sandbox.run(
        kind="python",
        code=code,
        input=b"",
        limits=LIMITS,
        checkpoints=Checkpointing(on_checkpoint=kept.append, max_bytes=1 << 20),
    )
    assert outcome.kind is OutcomeKind.OUTPUT_TOO_LARGE, outcome
    assert "CHECKPOINT frame of 4294967295 bytes exceeds 1048576" in (outcome.error or "")
    assert kept == []
    await assert_still_works(sandbox)


async def test_checkpoint_flood_is_bounded_and_keeps_only_the_latest(sandbox: Sandbox) -> None:
    """A job writing 64 MiB of 1 MiB checkpoints: the agent holds at most one at a time."""
    code = (
        b"from vcomp.guest import checkpoint, run\n"
        b"def handler(data, progress):\n"
        b"    for i in range(64):\n"
        b"        checkpoint(i.to_bytes(4, 'big') * (1 << 18))\n"
        b"    return b'done'\n"
        b"run(handler)\n"
    )
    latest: list[bytes] = []

    def keep(state: bytes) -> None:
        latest[:] = [state]  # what the agent's runtime does: only the latest is kept

    outcome = await sandbox.run(
        kind="python",
        code=code,
        input=b"",
        limits=LIMITS,
        checkpoints=Checkpointing(on_checkpoint=keep, max_bytes=1 << 20),
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    assert latest == [(63).to_bytes(4, "big") * (1 << 18)]
