"""The job's pipes (vcomp.agent.sandbox.pipes): RESUME in, CHECKPOINT frames out,
through the real sandbox. The checkpoint attacks are in test_escapes.py."""

from __future__ import annotations

import json

from vcomp.agent.sandbox import Checkpointing, OutcomeKind, Sandbox

from .conftest import EXAMPLES, LIMITS

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
