"""Outcome types and the sandbox-run exit codes."""

from __future__ import annotations

import json

from vcomp.agent.sandbox.outcome import EXIT_CODES, JobOutcome, OutcomeKind, Protection


def test_every_outcome_has_a_distinct_nonzero_exit_code_except_ok() -> None:
    assert set(EXIT_CODES) == set(OutcomeKind)
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes)
    assert EXIT_CODES[OutcomeKind.OK] == 0 and all(
        c for k, c in EXIT_CODES.items() if k.value != "ok"
    )


def test_json_summary_has_no_result_bytes() -> None:
    outcome = JobOutcome(
        kind=OutcomeKind.OK,
        result=b"secret output",
        stderr_tail=b"\xff log",
        protections=(Protection("seccomp", "active", "libseccomp"),),
    )
    data = outcome.to_json_dict()
    text = json.dumps(data)
    assert "secret output" not in text
    assert data["kind"] == "ok" and data["result_bytes"] == len(b"secret output")
    assert data["protections"][0]["name"] == "seccomp"
    assert outcome.ok and outcome.active_protections() == ["seccomp"]
