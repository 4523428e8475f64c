"""Operator hooks on a real server: validators on replicas, assimilators after commit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tests.integration.conftest import Lab, Org, python_job, wait_until
from vcomp.server.service import OrganisationServer
from vcomp.server.store import JobState

HOOKS = "tests.integration.hookfns"
# Each replica adds its own noise in the ninth digit; input 3 answers pure noise.
NOISY = python_job(
    """
import os
n = int(data)
noise = int.from_bytes(os.urandom(4), "big") / 2**32
if n == 3:
    return json.dumps({"x": noise}).encode()
return json.dumps({"x": n + 1.0 + noise * 1e-9, "tag": "r"}).encode()
"""
)


def log_lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


def replicated(org: Org, app: str, inputs: list[bytes], *, max_attempts: int = 1) -> int:
    return org.store.create_batch(
        app,
        inputs,
        replicas=2,
        quorum=2,
        max_attempts=max_attempts,
        cpu_seconds=30,
        memory_bytes=256 << 20,
        wall_seconds=60,
        output_bytes=1 << 16,
    )


async def assimilated_all(org: Org, batch: int, log: Path) -> list[list[str]]:
    """Wait until no job of the store is due for its assimilator; the log's lines."""
    done = org.store.batch_status(batch).done
    await wait_until(
        lambda: len(log_lines(log)) >= done and not org.store.due_assimilations(1e18, 10),
        "every done job assimilated",
        60,
    )
    return log_lines(log)


async def test_tolerant_validator_and_assimilator_with_real_agents(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    agents = [await lab.run_agent(lab.agent_config(org, f"agent{i}"), org) for i in range(2)]
    await wait_until(lambda: all(a.connected_sessions for a in agents), "2 agents connected")
    code_path = org.home / "noisy.py"
    code_path.write_bytes(NOISY)
    log = lab.root / "assimilated.log"
    org.store.add_app(
        "noisy",
        "python",
        code_path,
        validator="vcomp.validators:json_close?rel_tol=1e-6",
        assimilator=f"{HOOKS}:record?log={log}",
    )
    inputs = [b"%d" % i for i in range(6)]
    batch = replicated(org, "noisy", inputs)
    await org.wait_batch(batch, timeout=120)

    jobs = {i: org.store.get_job_by_index(batch, i) for i in range(6)}
    # Input 3: the replicas really disagree, recorded, and the job fails on no quorum.
    assert jobs[3].state is JobState.FAILED and jobs[3].disagreements >= 1
    assert jobs[3].reason is not None and "no quorum" in jobs[3].reason
    differing = 0
    for i in (0, 1, 2, 4, 5):
        assert jobs[i].state is JobState.DONE, jobs[i].reason
        outs = []
        for r in org.store.list_results(jobs[i].job_id):
            with org.store.open_output(r.job_id, r.attempt) as blob:
                outs.append(blob.read(0, blob.size))
        assert len(outs) == 2 and {json.loads(o)["tag"] for o in outs} == {"r"}
        differing += outs[0] != outs[1]
    # The noise made the replicas' bytes differ: byte equality would have failed these.
    assert differing >= 4

    lines = await assimilated_all(org, batch, log)
    # Exactly once per done job, with its canonical output; nothing for the failed one.
    assert sorted(int(ln[1]) for ln in lines) == [0, 1, 2, 4, 5]
    for job_id, index, output_hex in lines:
        job = jobs[int(index)]
        assert int(job_id) == job.job_id and job.canonical_attempt is not None
        with org.store.open_output(job.job_id, job.canonical_attempt) as blob:
            assert bytes.fromhex(output_hex) == blob.read(0, blob.size)
    assert org.server.assimilation.calls == 5
    assert org.store.hook_failures() == []


def small_batch(org: Org, app: str, n: int) -> int:
    return org.store.create_batch(
        app,
        [b"%d" % i for i in range(n)],
        cpu_seconds=10,
        memory_bytes=1 << 26,
        wall_seconds=10,
        output_bytes=1 << 16,
    )


async def two_lites(lab: Lab, org: Org) -> None:
    for name in ("lite1", "lite2"):
        await lab.lite(lab.lite_tpm(org, name), org.address, org.fingerprint, org=org)


async def test_a_failing_validator_keeps_the_job_and_shows_the_error(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    await two_lites(lab, org)
    path = org.home / "echo.app"
    path.write_bytes(b"echo")
    org.store.add_app("echo", "python", path, validator=f"{HOOKS}:broken_validator")
    org.store.add_app("echo2", "python", path, validator=f"{HOOKS}:not_an_output")
    first = replicated(org, "echo", [b"a", b"b"])
    second = replicated(org, "echo2", [b"c"])
    await org.wait_batch(first)
    await org.wait_batch(second)
    for batch in (first, second):
        job = org.store.get_job_by_index(batch, 0)
        # Not lost: failed with the validator's error and both results kept.
        assert job.state is JobState.FAILED
        assert job.reason is not None and job.reason.startswith("validator: "), job.reason
        assert len(org.store.list_results(job.job_id)) == 2
    failures = {f.job_id: f for f in org.store.hook_failures()}
    bug = failures[org.store.get_job_by_index(first, 0).job_id]
    assert bug.hook == "validator" and "RuntimeError: validator bug" in bug.error
    made_up = failures[org.store.get_job_by_index(second, 0).job_id]
    assert "neither one of the outputs nor DISAGREE" in made_up.error


async def test_a_raising_assimilator_is_retried_and_its_error_shown(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    await two_lites(lab, org)
    log = lab.root / "flaky.log"
    org.add_app("echo", b"echo")
    path = org.home / "echo.app"
    org.store.add_app("flaky", "python", path, assimilator=f"{HOOKS}:flaky?log={log}&fail=2")
    batch = org.store.create_batch(
        "flaky",
        [b"1", b"2"],
        cpu_seconds=10,
        memory_bytes=1 << 26,
        wall_seconds=10,
        output_bytes=1 << 16,
    )
    await org.wait_batch(batch)
    # The first call raised: the job stays done, its error is visible, it is due again.
    await wait_until(lambda: len(org.store.hook_failures()) == 2, "both first calls to fail")
    for failure in org.store.hook_failures():
        assert failure.hook == "assimilator" and "RuntimeError: flaky hook" in failure.error
        assert failure.retry_at is not None
        assert org.store.get_job(failure.job_id).state is JobState.DONE
    lines = await assimilated_all(org, batch, log)
    assert sorted(int(ln[1]) for ln in lines) == [0, 1]  # once each, once it succeeded
    assert org.store.hook_failures() == []
    assert org.server.assimilation.failures == 4


async def test_a_blocked_assimilator_does_not_stall_dispatch(lab: Lab) -> None:
    org = lab.org()
    await org.server.stop()  # never started: one with a single hook thread instead
    org = dataclasses.replace(
        org, server=OrganisationServer(dataclasses.replace(org.config, hook_threads=1))
    )
    await lab.start(org)
    agent = await lab.run_agent(lab.agent_config(org, "real"), org)  # a sandboxed agent
    await wait_until(lambda: agent.connected_sessions > 0, "the agent connected")
    log, gate = lab.root / "gate.log", lab.root / "gate.open"
    entered = Path(f"{log}.entered")
    code = org.home / "digest.py"
    code.write_bytes(python_job("return hashlib.sha256(data).hexdigest().encode()"))
    org.store.add_app("gated", "python", code, assimilator=f"{HOOKS}:gate?log={log}&gate={gate}")
    first = small_batch(org, "gated", 1)
    await wait_until(entered.exists, "the hook to block on the first job", 60)
    jobs = 10
    batch = small_batch(org, "gated", jobs)
    await org.wait_batch(batch, timeout=120)
    # Every job of the second batch was leased, run and committed while the one hook
    # thread stayed blocked in its first call.
    assert org.store.batch_status(batch).done == jobs
    assert len(entered.read_text().split()) == 1 and log_lines(log) == []
    gate.touch()
    await assimilated_all(org, first, log)
    lines = await assimilated_all(org, batch, log)
    first_job = org.store.get_job_by_index(first, 0).job_id
    assert sorted(int(ln[1]) for ln in lines if int(ln[0]) != first_job) == list(range(jobs))
    assert len(lines) == jobs + 1  # exactly once each


async def test_a_blocked_validator_does_not_stall_dispatch(lab: Lab) -> None:
    org = lab.org()
    await org.server.stop()  # never started: one with a single hook thread instead
    org = dataclasses.replace(
        org, server=OrganisationServer(dataclasses.replace(org.config, hook_threads=1))
    )
    await lab.start(org)
    await two_lites(lab, org)
    log, gate = lab.root / "vgate.log", lab.root / "vgate.open"
    entered = Path(f"{log}.entered")
    org.add_app("echo", b"echo")
    path = org.home / "echo.app"
    org.store.add_app(
        "gated", "python", path, validator=f"{HOOKS}:gate_validator?log={log}&gate={gate}"
    )
    validated = replicated(org, "gated", [b"v0", b"v1"])
    await wait_until(entered.exists, "the validator to block")
    plain = small_batch(org, "echo", 20)
    await org.wait_batch(plain)
    # The plain batch ran and committed while the one validator thread stayed blocked.
    assert org.store.batch_status(plain).done == 20
    assert len(entered.read_text().split()) == 1
    assert org.store.batch_status(validated).done == 0
    gate.touch()
    await org.wait_batch(validated)
    assert org.store.batch_status(validated).done == 2


async def test_assimilation_survives_a_server_restart(lab: Lab) -> None:
    org = lab.org()
    stopped: list[bool] = []

    async def stop_once() -> None:  # stopped by the test, or at teardown if it failed
        if not stopped:
            stopped.append(True)
            await org.server.stop()

    await org.server.start()
    lab.on_close(stop_once)
    await two_lites(lab, org)
    log, gate = lab.root / "restart.log", lab.root / "restart.open"
    org.add_app("echo", b"echo")
    org.store.add_app(
        "gated", "python", org.home / "echo.app", assimilator=f"{HOOKS}:gate?log={log}&gate={gate}"
    )
    batch = org.store.create_batch(
        "gated",
        [b"1", b"2", b"3"],
        cpu_seconds=10,
        memory_bytes=1 << 26,
        wall_seconds=10,
        output_bytes=1 << 16,
    )
    await org.wait_batch(batch)
    await wait_until(lambda: Path(f"{log}.entered").exists(), "the hook to be entered")
    # Stopped between the commit and the hook's return: nothing was marked assimilated.
    await stop_once()
    gate.touch()
    assert len(org.store.due_assimilations(1e18, 10)) == 3
    again = OrganisationServer(org.config)
    lab.on_close(again.stop)
    await again.start()
    lines = await assimilated_all(org, batch, log)
    # At least once: every job, the one cut short possibly twice.
    assert {int(ln[1]) for ln in lines} == {0, 1, 2}
