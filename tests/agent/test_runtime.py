"""The agent's RESULT ``detail`` for real sandboxed jobs (PROTOCOL.md section 5, RESULT)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from vcomp.agent.runtime import describe
from vcomp.agent.sandbox import JobLimits, JobOutcome, Sandbox
from vcomp.domain import MAX_ERROR_BYTES
from vcomp.protocol import limits
from vcomp.protocol.messages import PacketType, Result, decode_body, encode_body

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox is Linux only", allow_module_level=True)

LIMITS = JobLimits(cpu_seconds=10, memory_bytes=512 << 20, wall_seconds=20, output_bytes=1 << 20)


async def run(tmp_path: Path, body: str) -> JobOutcome:
    code = (
        f"from vcomp.guest import run\nimport os, sys\ndef handler(data):\n    {body}\n"
        "run(handler)\n"
    )
    sandbox = Sandbox(work_root=tmp_path / "work")
    try:
        return await sandbox.run(kind="python", code=code.encode(), input=b"", limits=LIMITS)
    finally:
        sandbox.close()


def on_the_wire(detail: str) -> str:
    """The detail as a RESULT summary carries it: valid UTF-8 of at most 256 bytes."""
    summary = Result(
        job=1, attempt=1, offset=0, total=0, data=b"", fin=True, sha256=hashlib.sha256().digest(),
        status="nonzero_exit", detail=detail, cpu_ms=0, wall_ms=0,
    )  # fmt: skip
    decoded = decode_body(PacketType.RESULT, encode_body(summary))
    assert isinstance(decoded, Result) and decoded.detail is not None
    return decoded.detail


async def test_a_long_error_frame_is_cut_to_256_bytes_on_a_character_boundary(
    tmp_path: Path,
) -> None:
    # 2000 euro signs: 6000 bytes, cut by the guest to the 4096-byte ERROR bound
    # (1361 whole signs after the type name), then by the agent to 256 bytes of detail.
    outcome = await run(tmp_path, 'raise ValueError("\\u20ac" * 2000)')
    assert outcome.error is not None
    head = len(b"ValueError: ")
    assert len(outcome.error.encode()) == head + 3 * ((MAX_ERROR_BYTES - head) // 3) == 4095
    detail = describe(outcome)
    raw = detail.encode()
    prefix = "nonzero_exit; exit code 1; ValueError: "
    assert detail.startswith(prefix + "\u20ac")
    # The longest whole-character prefix: one more euro sign would pass 256 bytes.
    assert len(raw) <= limits.MAX_TEXT < len(raw) + 3
    assert set(detail[len(prefix) :]) == {"\u20ac"}
    assert on_the_wire(detail) == detail


async def test_without_an_error_frame_the_detail_says_how_the_job_ended(tmp_path: Path) -> None:
    outcome = await run(tmp_path, 'sys.stderr.write("first\\nlast words\\n"); os._exit(3)')
    assert describe(outcome) == "nonzero_exit; exit code 3; stderr: last words"
    outcome = await run(tmp_path, "os._exit(0)")
    assert describe(outcome) == "protocol_violation; exit status 0 without a RESULT"
    outcome = await run(tmp_path, 'return b"fine"')
    assert describe(outcome) == "ok"
