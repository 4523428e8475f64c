"""The job store's rules: pure functions over records that every backend applies.

Leases, replicas and quorum, late results and evidence, refusals and the attempt budget
are decided here and only here (see the package docstring for the rules in words). A
backend reads the records a rule needs, calls it, and writes what it returns, so a
second backend is storage only. Two rules stay in each backend's SQL because they are
searches over many rows, not decisions about one: which queued job fits an agent (fit,
batch deadline, distinct hosts) and which jobs a passed batch deadline fails; the
contract suite pins both. Nothing here touches a database, so its tests need none.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vcomp.errors import HookError, StoreError
from vcomp.server.store.records import (
    REFUSAL_WINDOW,
    RESULT_OK,
    AttemptRecord,
    AttemptState,
    Batch,
    CandidateResult,
    JobState,
    OutcomeKind,
    ResultComparator,
)


def sha256_equal(a: CandidateResult, b: CandidateResult) -> bool:
    """The default comparator: byte-equal outputs (compared by size and SHA-256)."""
    return a.output_size == b.output_size and a.output_sha256 == b.output_sha256


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a live job stands after a result, a failed attempt or an expiry."""

    state: JobState
    pending: int  # replica slots that should wait for a lease
    canonical_attempt: int | None = None  # set when done
    reason: str | None = None  # set when failed


def group_results(
    candidates: Sequence[CandidateResult],
    comparator: ResultComparator,
    quorum: int,
    hook_errors: list[str] | None = None,
) -> list[list[CandidateResult]]:
    """Partition ok results (in attempt order) into groups that agree.

    With ``quorum == 1`` the first result wins and nothing is compared. A validator
    that fails (HookError) counts as a disagreement; its text goes to ``hook_errors``.
    """
    if quorum == 1:
        return [list(candidates[:1])] if candidates else []
    groups: list[list[CandidateResult]] = []
    for candidate in candidates:
        for group in groups:
            try:
                same = comparator(group[0], candidate)
            except HookError as exc:
                if hook_errors is None:
                    raise
                hook_errors.append(str(exc))
                same = False
            except Exception as exc:
                raise StoreError(f"result comparator failed: {exc}") from exc
            if same:
                group.append(candidate)
                break
        else:
            groups.append([candidate])
    return groups


def is_disagreement(groups: Sequence[Sequence[CandidateResult]], attempt: int) -> bool:
    """Did the result of ``attempt`` agree with nobody while other results exist?"""
    if len(groups) < 2:
        return False
    return any(len(g) == 1 and g[0].attempt == attempt for g in groups)


def judge(
    groups: Sequence[Sequence[CandidateResult]],
    *,
    quorum: int,
    budget: int,
    pending: int,
    leased: int,
    attempts: int,
    last_failure: str | None,
) -> Verdict:
    """The replication rule every backend applies (see the package docstring).

    Done once a group reaches ``quorum`` (its earliest attempt is canonical). Otherwise
    issue just enough replica slots that the outstanding ones could still reach a
    quorum, as far as the attempt budget allows; when they cannot, fail with a reason.
    """
    best = max((len(g) for g in groups), default=0)
    if best >= quorum:
        winner = next(g for g in groups if len(g) >= quorum)
        return Verdict(JobState.DONE, 0, canonical_attempt=winner[0].attempt)
    needed = quorum - best
    outstanding = pending + leased
    if outstanding < needed:
        room = max(0, budget - attempts - pending)
        extra = min(needed - outstanding, room)
        pending += extra
        outstanding += extra
    if outstanding < needed:
        if groups:
            reason = (
                f"no quorum: {sum(len(g) for g in groups)} results in {len(groups)} "
                f"disagreeing groups, largest {best} of {quorum} needed; "
                f"attempt budget {budget} used up"
            )
        else:
            reason = (
                f"failed after {attempts} attempts (budget {budget}); "
                f"last: {last_failure or 'unknown'}"
            )
        return Verdict(JobState.FAILED, 0, reason=reason)
    return Verdict(JobState.QUEUED if pending > 0 else JobState.LEASED, pending)


# ---------------------------------------------------------------------- leases


def job_state_after_lease(pending: int) -> JobState:
    """A job with ``pending`` replica slots waiting, one of which is leased now."""
    return JobState.QUEUED if pending > 1 else JobState.LEASED


def refusal_window_start(now: float) -> float:
    """Refusals that ended after this moment count towards an agent's cap."""
    return now - REFUSAL_WINDOW


def refusals_exhausted(refusals: int, cap: int | None) -> bool:
    """Has an agent refused too often in the window to get another lease?"""
    return cap is not None and refusals >= cap


def renewed_deadline(
    attempt: AttemptRecord,
    job_state: JobState,
    *,
    now: float,
    lease_seconds: float,
    wall_seconds: float,
    transfer_seconds: float,
) -> float | None:
    """The new deadline of a renewed lease, or None when it is no longer the live lease.

    Never past the hard deadline, ``leased_at + lease_seconds + wall_seconds +
    transfer_seconds``: a holder that keeps renewing but never finishes loses the job
    then, and expiry reissues it.
    """
    if attempt.state is not AttemptState.LEASED or job_state.terminal:
        return None
    hard = attempt.leased_at + lease_seconds + wall_seconds + transfer_seconds
    return min(now + lease_seconds, hard)


def refused_attempt_state(offer_again: bool) -> AttemptState:
    """An agent hands back its lease: ``abandoned`` may come back to it, ``refused`` never."""
    return AttemptState.ABANDONED if offer_again else AttemptState.REFUSED


# The attempt states of one agent that drew on a job's budget (a live lease and an ok
# result already keep the job from that agent; refusals and abandons are not charged).
CHARGED_STATES = (AttemptState.ERRORED, AttemptState.EXPIRED, AttemptState.RELEASED)


def agent_attempt_cap(max_attempts: int) -> int:
    """Charged attempts of one job one agent may have: fewer than the job's budget, so
    no single agent (a key that errors every job, or sits on it past its deadline) can
    fail a job alone; the job waits for another agent or its batch deadline instead.
    A budget of one is that agent's one try. ``LEASE_PICK`` applies this in SQL."""
    return max(1, max_attempts - 1)


def may_lease_again(charged_by_agent: int, max_attempts: int) -> bool:
    """May an agent with ``charged_by_agent`` charged attempts of a job get another?"""
    return charged_by_agent < agent_attempt_cap(max_attempts)


def charged_attempts(attempts: int, uncharged: int) -> int:
    """Attempts that drew on the budget: every lease but the agents' refusals."""
    return attempts - uncharged


# ---------------------------------------------------------------------- results


def checked_status(status: str, error: str, size: int, limit: int) -> tuple[str, str]:
    """A result's status after the output-size check (inline output the sandbox should
    have stopped makes a failed attempt)."""
    if size > limit:
        return "output_too_large", f"output of {size} bytes exceeds the limit of {limit}"
    return status, error


def failure_reason(status: str, error: str, max_len: int) -> str | None:
    """What a failed attempt's record says (None for an ok result)."""
    if status == RESULT_OK:
        return None
    return f"{status}: {error}"[:max_len] if error else status


#: A job failing with the same status and error this many times stops being retried
#: (``[jobs] stop_after_same_failures``; 0 retries up to the attempt budget).
DEFAULT_SAME_FAILURES = 2


def repeated_failure(failure: str, earlier_same: int, limit: int) -> str | None:
    """The reason to fail a job now, when this failure makes ``limit`` alike (a
    deterministic failure: running it again would fail again); else None."""
    if limit < 1 or earlier_same + 1 < limit:
        return None
    return (
        f"{failure} (the same failure {earlier_same + 1} times: not retried, "
        f"see [jobs] stop_after_same_failures)"
    )


def classify_result(
    job_state: JobState,
    attempt_state: AttemptState,
    *,
    ok: bool,
    pending: int,
    agent_holds: Callable[[], bool],
) -> OutcomeKind:
    """ACCEPTED, LATE or EVIDENCE for a first result of a known attempt of its agent.

    ``agent_holds`` says whether the agent holds another live lease or an ok result for
    the job; it is asked only when the answer matters.
    """
    if job_state.terminal:
        return OutcomeKind.EVIDENCE
    if attempt_state is AttemptState.LEASED:
        return OutcomeKind.ACCEPTED
    if (
        ok
        and attempt_state in (AttemptState.EXPIRED, AttemptState.RELEASED)
        and pending > 0
        and not agent_holds()
    ):
        # The lease lapsed but its replacement was not handed out yet: the work is
        # still wanted, so count it rather than run the job again.
        return OutcomeKind.LATE
    return OutcomeKind.EVIDENCE


class SlotChange(enum.Enum):
    """Which of a job's replica counters a recorded result changes."""

    NONE = "none"  # evidence: nothing changes
    FAIL_LEASED = "fail_leased"  # an accepted failure: a leased slot fails (settle decides)
    FREE_LEASED = "free_leased"  # an accepted ok result fills its leased slot
    FILL_PENDING = "fill_pending"  # a late ok result fills a slot waiting for a lease


@dataclass(frozen=True, slots=True)
class ResultEffect:
    """What recording one result changes, besides storing it."""

    counted: bool
    ends_attempt: AttemptState | None  # the attempt's new state, if it changes
    slots: SlotChange


def result_effect(kind: OutcomeKind, attempt_state: AttemptState, *, ok: bool) -> ResultEffect:
    counted = kind in (OutcomeKind.ACCEPTED, OutcomeKind.LATE)
    ends = None
    if attempt_state is AttemptState.LEASED or kind is OutcomeKind.LATE:
        ends = AttemptState.SUCCEEDED if ok else AttemptState.ERRORED
    if kind is OutcomeKind.ACCEPTED:
        slots = SlotChange.FREE_LEASED if ok else SlotChange.FAIL_LEASED
    elif kind is OutcomeKind.LATE:
        slots = SlotChange.FILL_PENDING
    else:
        slots = SlotChange.NONE
    return ResultEffect(counted, ends, slots)


# ---------------------------------------------------------------------- replication


@dataclass(frozen=True, slots=True)
class Settlement:
    """A live job's new standing; ``disagreeing_groups`` is set when the new result
    agreed with nobody (a disagreement to record)."""

    verdict: Verdict
    disagreeing_groups: int | None
    hook_error: str | None = None  # the app's validator failed (the last error)


def settle(
    candidates: Sequence[CandidateResult],
    comparator: ResultComparator,
    batch: Batch,
    *,
    pending: int,
    leased: int,
    charged: int,
    last_failure: str | None,
    new_attempt: int | None = None,
) -> Settlement:
    """Bring a live job in line with its counted ok results, leases and budget."""
    hook_errors: list[str] = []
    groups = group_results(candidates, comparator, batch.quorum, hook_errors)
    disagreeing = None
    if new_attempt is not None and is_disagreement(groups, new_attempt):
        disagreeing = len(groups)
    verdict = judge(
        groups,
        quorum=batch.quorum,
        budget=batch.attempt_budget,
        pending=pending,
        leased=leased,
        attempts=charged,
        last_failure=last_failure,
    )
    hook_error = hook_errors[-1] if hook_errors else None
    if hook_error is not None and verdict.reason is not None:
        verdict = Verdict(verdict.state, verdict.pending, reason=f"{hook_error}; {verdict.reason}")
    return Settlement(verdict, disagreeing, hook_error)
