"""BOINC-style replication: replicas go to distinct agents and a quorum decides."""

from __future__ import annotations

from tests.integration.conftest import Lab, echo_reference, wait_until
from vcomp.server.store import JobState


async def test_replicas_reach_distinct_agents_and_agree(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    code = org.add_app("echo", b"replicated job")
    # Two agents with their own attestation keys: each job needs both of them.
    first = await lab.lite(lab.lite_tpm(org, "first"), org.address, org.fingerprint, org=org)
    second = await lab.lite(lab.lite_tpm(org, "second"), org.address, org.fingerprint, org=org)
    inputs = [b"%d" % i for i in range(12)]
    batch = org.store.create_batch(
        "echo",
        inputs,
        replicas=2,
        quorum=2,
        cpu_seconds=10,
        memory_bytes=64 << 20,
        wall_seconds=10,
        output_bytes=1 << 16,
    )
    # A None lease for the agent that already answered must not stall the other.
    await org.wait_batch(batch, timeout=60)

    assert org.store.batch_status(batch).done == len(inputs)
    assert first.stats.jobs == second.stats.jobs == len(inputs)
    for index, (stored, output) in org.outputs(batch).items():
        assert output == echo_reference(code, inputs[index])
        assert org.store.get_job(stored.job_id).state is JobState.DONE
        results = org.store.list_results(stored.job_id)
        assert len({r.attempt for r in results}) == len(results) == 2
        assert len({r.agent_id for r in results}) == 2  # two distinct agents


async def test_an_ineligible_idle_agent_does_not_stall_the_queue(lab: Lab) -> None:
    """The agent that already answered a replica is idle too; the other must still get it."""
    org = lab.org()
    await lab.start(org)
    org.add_app("echo", b"replicated job")
    first = await lab.lite(lab.lite_tpm(org, "first"), org.address, org.fingerprint, org=org)
    second_tpm = lab.lite_tpm(org, "second")
    # Several rounds: the idle set's order is arbitrary, so one round could pass by luck.
    for round_ in range(4):
        batch = org.store.create_batch(
            "echo",
            [b"round %d" % round_],
            replicas=2,
            quorum=2,
            cpu_seconds=10,
            memory_bytes=64 << 20,
            wall_seconds=10,
            output_bytes=1 << 16,
        )
        done = round_ + 1
        await wait_until(lambda n=done: first.stats.committed == n, "first replica", 20)
        second = await lab.lite(second_tpm, org.address, org.fingerprint, org=org)
        await org.wait_batch(batch, timeout=20)
        assert second.stats.jobs == 1
        await second.stop()
