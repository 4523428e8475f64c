"""Hooks in the store, on every backend: an app's validator decides agreement, and a
done job of an app with an assimilator stays due until the hook returned."""

from __future__ import annotations

import io
import json

from tests.server.store.conftest import StoreFactory
from tests.server.store.support import enroll, lease, ok
from vcomp.server.hooks import judge_pairs
from vcomp.server.store import JobState, Store

HOOKS = "tests.integration.hookfns"


def validate(store: Store) -> int:
    """What the server's Validation runner does, here on this thread: pairs judged."""
    judged = 0
    for due in store.due_validations(1e18, 100):
        store.record_verdicts(due.job_id, judge_pairs(store, due), 1e9)
        judged += len(due.pairs)
    return judged


def replicated(store: Store, app: str, n: int = 1) -> int:
    return store.create_batch(app, [b"%d" % i for i in range(n)], replicas=2, quorum=2)


def test_a_done_job_is_due_until_its_assimilator_returned(store: Store, agents: list[str]) -> None:
    store.add_app("plain", "python", io.BytesIO(b"x"))
    store.add_app("hooked", "python", io.BytesIO(b"x"), assimilator=f"{HOOKS}:record?log=x")
    assert store.get_app("hooked").assimilator == f"{HOOKS}:record?log=x"
    store.create_batch("plain", [b"p"])
    store.record_results([ok(lease(store, agents[0], now=1.0))])
    batch = store.create_batch("hooked", [b"h"])
    held = lease(store, agents[0], now=2.0)
    assert store.due_assimilations(1e18, 10) == []  # not done yet
    store.record_results([ok(held)])

    (due,) = store.due_assimilations(1e18, 10)  # the plain app's job never is
    assert (due.job_id, due.batch_id, due.index) == (held.job_id, batch, 0)
    assert due.canonical_attempt == held.attempt and due.tries == 0
    assert due.app.name == "hooked"

    store.assimilation_failed(held.job_id, "assimilator: RuntimeError: boom\nline 2", 5e9)
    (failure,) = store.hook_failures()
    assert failure.hook == "assimilator" and failure.error.endswith("boom\nline 2")
    assert failure.retry_at == 5e9 and failure.tries == 1
    assert store.due_assimilations(4e9, 10) == []  # waits for its retry time
    assert [d.tries for d in store.due_assimilations(5e9, 10)] == [1]

    store.assimilated(held.job_id, 6e9)
    assert store.due_assimilations(1e18, 10) == [] and store.hook_failures() == []
    store.assimilation_failed(held.job_id, "late", 7e9)  # after it returned: ignored
    assert store.due_assimilations(1e18, 10) == [] and store.hook_failures() == []
    assert store.get_job(held.job_id).state is JobState.DONE


def test_a_validator_replaces_byte_equality(store: Store, agents: list[str]) -> None:
    store.add_app(
        "close", "python", io.BytesIO(b"x"), validator="vcomp.validators:json_close?rel_tol=1e-3"
    )
    store.add_app("bytes", "python", io.BytesIO(b"x"))
    outputs = [json.dumps({"x": 1.0}).encode(), json.dumps({"x": 1.0001}).encode()]
    tolerant = replicated(store, "close")
    first, second = lease(store, agents[0]), lease(store, agents[1])
    store.record_results([ok(first, outputs[0]), ok(second, outputs[1])])
    # Not judged in the result's transaction: the job waits for its validator.
    job = store.get_job_by_index(tolerant, 0)
    assert job.state is JobState.LEASED and job.leased == job.pending == 0
    (due,) = store.due_validations(1e18, 10)
    assert due.job_id == job.job_id and due.pairs == ((first.attempt, second.attempt),)
    assert validate(store) == 1 and store.due_validations(1e18, 10) == []
    job = store.get_job_by_index(tolerant, 0)
    assert job.state is JobState.DONE and job.canonical_attempt == first.attempt

    exact = replicated(store, "bytes")
    first, second = lease(store, agents[0]), lease(store, agents[1])
    store.record_results([ok(first, outputs[0]), ok(second, outputs[1])])
    assert store.get_job_by_index(exact, 0).disagreements == 1
    assert store.due_validations(1e18, 10) == []  # byte equality needs no validator


def test_a_validator_disagreement_asks_for_another_replica(store: Store, agents: list[str]) -> None:
    store.add_app("close", "python", io.BytesIO(b"x"), validator="vcomp.validators:json_close")
    batch = store.create_batch("close", [b"0"], replicas=2, quorum=2, max_attempts=2)
    first, second = lease(store, agents[0]), lease(store, agents[1])
    store.record_results([ok(first, b'{"x": 1}'), ok(second, b'{"x": 2}')])
    validate(store)
    job = store.get_job_by_index(batch, 0)
    assert job.state is JobState.QUEUED and job.disagreements == 1 and job.pending == 1
    third = lease(store, agents[2])
    store.record_results([ok(third, b'{"x": 1.0}')])
    assert validate(store) == 2  # the new result against each earlier one
    job = store.get_job_by_index(batch, 0)
    assert job.state is JobState.DONE and job.canonical_attempt == first.attempt


def test_a_validator_that_raises_fails_no_other_result(store: Store, agents: list[str]) -> None:
    store.add_app("broken", "python", io.BytesIO(b"x"), validator=f"{HOOKS}:broken_validator")
    store.add_app("missing", "python", io.BytesIO(b"x"), validator="no_such_module_x:fn")
    store.add_app("fine", "python", io.BytesIO(b"x"))
    broken = store.create_batch("broken", [b"0"], replicas=2, quorum=2, max_attempts=1)
    missing = store.create_batch("missing", [b"0"], replicas=2, quorum=2, max_attempts=1)
    fine = store.create_batch("fine", [b"0"])
    held = [lease(store, a) for a in agents[:2] for _ in range(2)]
    held.append(lease(store, agents[2]))
    outcomes = store.record_results([ok(h) for h in held])
    assert all(o.durable for o in outcomes)
    assert store.get_job_by_index(fine, 0).state is JobState.DONE
    assert validate(store) == 2
    for batch, text in ((broken, "RuntimeError: validator bug"), (missing, "cannot import")):
        job = store.get_job_by_index(batch, 0)
        assert job.state is JobState.FAILED and job.reason is not None
        assert job.reason.startswith("validator: ") and text in job.reason
        assert len(store.list_results(job.job_id)) == 2  # the outputs are kept
    assert {f.hook for f in store.hook_failures()} == {"validator"}
    assert len(store.hook_failures()) == 2


# ------------------------------------------------------------- deterministic failures
# (here with the other result policies an operator configures: [jobs] in server.toml)


def fail(store: Store, agent: str, error: str, status: str = "nonzero_exit") -> JobState:
    (outcome,) = store.record_results([ok(lease(store, agent), b"", status=status, error=error)])
    return outcome.job_state


def test_the_same_failure_twice_stops_the_retries(store: Store, agents: list[str]) -> None:
    store.add_app("app", "python", io.BytesIO(b"x"))
    batch = store.create_batch("app", [b"0"], max_attempts=5)
    assert fail(store, agents[0], "ZeroDivisionError: division by zero") is JobState.QUEUED
    assert fail(store, agents[1], "ZeroDivisionError: division by zero") is JobState.FAILED
    job = store.get_job_by_index(batch, 0)
    assert job.attempts == 2 and job.reason is not None
    assert job.reason.startswith("nonzero_exit: ZeroDivisionError: division by zero")
    assert "the same failure 2 times" in job.reason


def test_one_agent_repeating_a_failure_cannot_fail_a_job_alone(
    store: Store, agents: list[str]
) -> None:
    # A hostile (or broken) agent answers every job with the same failure: each of its
    # attempts costs budget as before, but its repeats are one voice, not two.
    store.add_app("app", "python", io.BytesIO(b"x"))
    batch = store.create_batch("app", [b"0"], max_attempts=4)
    assert fail(store, agents[0], "forged: same text") is JobState.QUEUED
    assert fail(store, agents[0], "forged: same text") is JobState.QUEUED
    assert fail(store, agents[0], "forged: same text") is JobState.QUEUED
    assert store.get_job_by_index(batch, 0).attempts == 3
    (honest,) = store.record_results([ok(lease(store, agents[1]), b"42")])
    assert honest.job_state is JobState.DONE


def test_different_failures_are_retried(store: Store, agents: list[str]) -> None:
    store.add_app("app", "python", io.BytesIO(b"x"))
    batch = store.create_batch("app", [b"0"], max_attempts=3)
    assert fail(store, agents[0], "MemoryError") is JobState.QUEUED
    assert fail(store, agents[1], "MemoryError", status="memory_limit") is JobState.QUEUED
    assert fail(store, agents[2], "ValueError") is JobState.FAILED  # the budget, as before
    assert "failed after 3 attempts" in (store.get_job_by_index(batch, 0).reason or "")


def test_stopping_on_the_same_failure_can_be_turned_off(
    make_store: StoreFactory, agents: list[str]
) -> None:
    store = make_store(same_failures=0)
    for name in ("a", "b", "c"):
        enroll(store, name)
    agents = [a.agent_id for a in store.list_agents()]
    store.add_app("app", "python", io.BytesIO(b"x"))
    store.create_batch("app", [b"0"], max_attempts=3)
    assert [fail(store, a, "boom") for a in agents] == [
        JobState.QUEUED,
        JobState.QUEUED,
        JobState.FAILED,
    ]
