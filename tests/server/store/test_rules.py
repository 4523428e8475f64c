"""The store's rules (rules.py): pure functions, tested with no database."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.errors import StoreError
from vcomp.server.store import (
    CandidateResult,
    JobState,
    group_results,
    is_disagreement,
    judge,
    sha256_equal,
)


def candidate(attempt: int, output: bytes) -> CandidateResult:
    return CandidateResult(
        job_id=1,
        attempt=attempt,
        agent_id=f"agent-{attempt}",
        output_size=len(output),
        output_sha256=hashlib.sha256(output).digest(),
        read=lambda: output,
    )


def test_grouping_by_sha_and_disagreement() -> None:
    results = [candidate(1, b"a"), candidate(2, b"b"), candidate(3, b"a")]
    groups = group_results(results, sha256_equal, quorum=2)
    assert [[c.attempt for c in g] for g in groups] == [[1, 3], [2]]
    assert is_disagreement(groups, 2)
    assert not is_disagreement(groups, 3)
    assert group_results(results, sha256_equal, quorum=1) == [[results[0]]]


def test_comparator_failure_is_a_store_error() -> None:
    def broken(a: CandidateResult, b: CandidateResult) -> bool:
        raise ValueError("cannot parse")

    with pytest.raises(StoreError, match="comparator failed: cannot parse"):
        group_results([candidate(1, b"a"), candidate(2, b"b")], broken, quorum=2)


def test_judge_done_picks_earliest_attempt_of_winning_group() -> None:
    groups = group_results(
        [candidate(2, b"x"), candidate(4, b"y"), candidate(5, b"y")], sha256_equal, quorum=2
    )
    verdict = judge(groups, quorum=2, budget=6, pending=0, leased=1, attempts=5, last_failure=None)
    assert verdict.state is JobState.DONE and verdict.canonical_attempt == 4


def test_judge_issues_tie_breaker_then_fails_when_budget_is_gone() -> None:
    groups = group_results([candidate(1, b"x"), candidate(2, b"y")], sha256_equal, quorum=2)
    more = judge(groups, quorum=2, budget=4, pending=0, leased=0, attempts=2, last_failure=None)
    assert (more.state, more.pending) == (JobState.QUEUED, 1)
    gone = judge(groups, quorum=2, budget=2, pending=0, leased=0, attempts=2, last_failure=None)
    assert gone.state is JobState.FAILED and gone.reason and gone.reason.startswith("no quorum")


def test_judge_waits_for_outstanding_replicas() -> None:
    groups = group_results([candidate(1, b"x")], sha256_equal, quorum=2)
    verdict = judge(groups, quorum=2, budget=6, pending=0, leased=2, attempts=3, last_failure=None)
    assert (verdict.state, verdict.pending) == (JobState.LEASED, 0)


def test_judge_failure_reason_names_last_failure() -> None:
    verdict = judge([], quorum=1, budget=3, pending=0, leased=0, attempts=3, last_failure="oom")
    assert verdict.state is JobState.FAILED
    assert verdict.reason == "failed after 3 attempts (budget 3); last: oom"


@given(
    quorum=st.integers(1, 4),
    extra=st.integers(0, 3),
    max_attempts=st.integers(1, 4),
    outputs=st.lists(st.sampled_from([b"a", b"b", b"c"]), max_size=12),
    leased=st.integers(0, 4),
)
def test_judge_never_exceeds_the_budget(
    quorum: int, extra: int, max_attempts: int, outputs: list[bytes], leased: int
) -> None:
    replicas = quorum + extra
    budget = replicas * max_attempts
    attempts = min(len(outputs) + leased, budget)
    results = [candidate(i + 1, out) for i, out in enumerate(outputs[: attempts - leased])]
    leased = attempts - len(results)
    groups = group_results(results, sha256_equal, quorum)
    verdict = judge(
        groups,
        quorum=quorum,
        budget=budget,
        pending=0,
        leased=leased,
        attempts=attempts,
        last_failure="x",
    )
    assert attempts + verdict.pending <= budget
    best = max((len(g) for g in groups), default=0)
    if best >= quorum:
        assert verdict.state is JobState.DONE
    elif verdict.state is not JobState.FAILED:
        assert best + leased + verdict.pending >= quorum  # a quorum is still reachable
