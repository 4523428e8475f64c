"""The store's rules (rules.py): pure functions, tested with no database."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.errors import StoreError
from vcomp.server.store import (
    REFUSAL_WINDOW,
    App,
    AppKind,
    AttemptRecord,
    AttemptState,
    Batch,
    CandidateResult,
    JobLimits,
    JobState,
    OutcomeKind,
    Verdict,
    group_results,
    is_disagreement,
    judge,
    sha256_equal,
)
from vcomp.server.store.rules import (
    ResultEffect,
    SlotChange,
    charged_attempts,
    checked_status,
    classify_result,
    failure_reason,
    job_state_after_lease,
    refusal_window_start,
    refusals_exhausted,
    refused_attempt_state,
    renewed_deadline,
    result_effect,
    settle,
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


# ---------------------------------------------------------------------- leases


def attempt_record(state: AttemptState, leased_at: float = 100.0) -> AttemptRecord:
    return AttemptRecord(1, 1, "a" * 64, state, leased_at, leased_at + 30.0, None, None)


def test_a_lease_takes_one_waiting_slot() -> None:
    assert job_state_after_lease(pending=3) is JobState.QUEUED
    assert job_state_after_lease(pending=1) is JobState.LEASED


def test_refusal_cap_and_window() -> None:
    assert refusal_window_start(10_000.0) == 10_000.0 - REFUSAL_WINDOW
    assert not refusals_exhausted(1000, None)
    assert not refusals_exhausted(2, 3)
    assert refusals_exhausted(3, 3)
    assert refused_attempt_state(offer_again=False) is AttemptState.REFUSED
    assert refused_attempt_state(offer_again=True) is AttemptState.ABANDONED
    assert charged_attempts(5, 2) == 3


def test_no_agent_may_use_up_a_jobs_attempt_budget_alone() -> None:
    from vcomp.server.store.rules import CHARGED_STATES, agent_attempt_cap, may_lease_again

    assert agent_attempt_cap(1) == 1  # a budget of one is that agent's one try
    assert [agent_attempt_cap(n) for n in (2, 3, 5)] == [1, 2, 4]
    assert may_lease_again(0, 1) and not may_lease_again(1, 1)
    assert may_lease_again(1, 3) and not may_lease_again(2, 3)
    assert set(CHARGED_STATES) == {
        AttemptState.ERRORED,
        AttemptState.EXPIRED,
        AttemptState.RELEASED,
    }


def test_renewal_extends_a_live_lease_up_to_the_hard_deadline() -> None:
    def renew(record: AttemptRecord, job: JobState, now: float) -> float | None:
        return renewed_deadline(
            record, job, now=now, lease_seconds=30.0, wall_seconds=60.0, transfer_seconds=10.0
        )

    live = attempt_record(AttemptState.LEASED)
    assert renew(live, JobState.LEASED, now=110.0) == 140.0
    assert renew(live, JobState.QUEUED, now=190.0) == 100.0 + 30.0 + 60.0 + 10.0  # capped
    assert renew(live, JobState.DONE, now=110.0) is None  # the job finished meanwhile
    for stale in (AttemptState.EXPIRED, AttemptState.RELEASED, AttemptState.SUCCEEDED):
        assert renew(attempt_record(stale), JobState.LEASED, now=110.0) is None


# ---------------------------------------------------------------------- results


def test_output_over_the_limit_fails_the_attempt() -> None:
    assert checked_status("ok", "", 10, 10) == ("ok", "")
    status, error = checked_status("ok", "", 11, 10)
    assert status == "output_too_large" and "11 bytes exceeds the limit of 10" in error
    assert failure_reason("ok", "", 100) is None
    assert failure_reason("crashed", "", 100) == "crashed"
    assert failure_reason("crashed", "x" * 500, 20) == "crashed: " + "x" * 11


@pytest.mark.parametrize(
    ("job", "attempt", "ok", "pending", "holds", "kind"),
    [
        (JobState.DONE, AttemptState.LEASED, True, 0, False, OutcomeKind.EVIDENCE),
        (JobState.FAILED, AttemptState.EXPIRED, True, 1, False, OutcomeKind.EVIDENCE),
        (JobState.LEASED, AttemptState.LEASED, True, 0, False, OutcomeKind.ACCEPTED),
        (JobState.LEASED, AttemptState.LEASED, False, 0, False, OutcomeKind.ACCEPTED),
        (JobState.QUEUED, AttemptState.EXPIRED, True, 1, False, OutcomeKind.LATE),
        (JobState.QUEUED, AttemptState.RELEASED, True, 1, False, OutcomeKind.LATE),
        (JobState.QUEUED, AttemptState.EXPIRED, True, 1, True, OutcomeKind.EVIDENCE),
        (JobState.LEASED, AttemptState.EXPIRED, True, 0, False, OutcomeKind.EVIDENCE),
        (JobState.QUEUED, AttemptState.EXPIRED, False, 1, False, OutcomeKind.EVIDENCE),
        (JobState.QUEUED, AttemptState.REFUSED, True, 1, False, OutcomeKind.EVIDENCE),
    ],
)
def test_classify_result(
    job: JobState, attempt: AttemptState, ok: bool, pending: int, holds: bool, kind: OutcomeKind
) -> None:
    assert classify_result(job, attempt, ok=ok, pending=pending, agent_holds=lambda: holds) is kind


def test_classify_asks_about_other_holdings_only_for_a_possible_late_result() -> None:
    def never() -> bool:
        raise AssertionError("asked")

    assert (
        classify_result(JobState.LEASED, AttemptState.LEASED, ok=True, pending=0, agent_holds=never)
        is OutcomeKind.ACCEPTED
    )
    assert (
        classify_result(
            JobState.QUEUED, AttemptState.EXPIRED, ok=False, pending=1, agent_holds=never
        )
        is OutcomeKind.EVIDENCE
    )


def test_result_effects() -> None:
    accepted_ok = result_effect(OutcomeKind.ACCEPTED, AttemptState.LEASED, ok=True)
    assert accepted_ok == ResultEffect(True, AttemptState.SUCCEEDED, SlotChange.FREE_LEASED)
    accepted_error = result_effect(OutcomeKind.ACCEPTED, AttemptState.LEASED, ok=False)
    assert accepted_error == ResultEffect(True, AttemptState.ERRORED, SlotChange.FAIL_LEASED)
    late = result_effect(OutcomeKind.LATE, AttemptState.EXPIRED, ok=True)
    assert late == ResultEffect(True, AttemptState.SUCCEEDED, SlotChange.FILL_PENDING)
    stale = result_effect(OutcomeKind.EVIDENCE, AttemptState.EXPIRED, ok=True)
    assert stale == ResultEffect(False, None, SlotChange.NONE)
    # Evidence for a lease that is still live on a finished job ends that lease.
    finished = result_effect(OutcomeKind.EVIDENCE, AttemptState.LEASED, ok=True)
    assert finished == ResultEffect(False, AttemptState.SUCCEEDED, SlotChange.NONE)


# ---------------------------------------------------------------------- settling


def batch(replicas: int, quorum: int, max_attempts: int) -> Batch:
    app = App(1, "pi", 1, AppKind.PYTHON, 0, b"\0" * 32, 0.0)
    limits = JobLimits(1.0, 1, 1.0, 1)
    return Batch(1, app, 0.0, 1, replicas, quorum, max_attempts, limits, None)


def test_settle_records_a_disagreement_and_asks_for_another_replica() -> None:
    results = [candidate(1, b"a"), candidate(2, b"b")]
    settled = settle(
        results, sha256_equal, batch(2, 2, 2),
        pending=0, leased=0, charged=2, last_failure=None, new_attempt=2,
    )  # fmt: skip
    assert settled.disagreeing_groups == 2
    assert settled.verdict == Verdict(JobState.QUEUED, 1)


def test_settle_agreement_is_done_and_no_disagreement() -> None:
    results = [candidate(1, b"a"), candidate(2, b"a")]
    settled = settle(
        results, sha256_equal, batch(2, 2, 1),
        pending=0, leased=0, charged=2, last_failure=None, new_attempt=2,
    )  # fmt: skip
    assert settled.disagreeing_groups is None
    assert settled.verdict == Verdict(JobState.DONE, 0, canonical_attempt=1)


def test_settle_fails_when_the_budget_is_spent() -> None:
    settled = settle(
        [], sha256_equal, batch(1, 1, 2),
        pending=0, leased=0, charged=2, last_failure="lease expired",
    )  # fmt: skip
    assert settled.verdict.state is JobState.FAILED
    assert settled.verdict.reason is not None and "last: lease expired" in settled.verdict.reason
