"""The happy path: a Monte-Carlo pi batch across three real sandboxed agents."""

from __future__ import annotations

import hashlib
import json
import math

from tests.integration.conftest import (
    PI_PY,
    Lab,
    pi_inputs,
    pi_reference,
    python_job,
    wait_until,
)
from vcomp.server.store import AttemptState

JOBS = 20
POINTS = 50_000


async def test_pi_batch_across_three_agents(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    configs = [lab.agent_config(org, f"agent{i}") for i in range(3)]
    agents = [await lab.run_agent(c, org) for c in configs]
    # All three hold a session before the batch exists, so each gets work.
    await wait_until(lambda: all(a.connected_sessions for a in agents), "3 agents connected")
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(JOBS, POINTS)
    batch = org.submit("pi", inputs)

    await org.wait_batch(batch, timeout=90)

    outputs = org.outputs(batch)
    assert sorted(outputs) == list(range(JOBS))
    inside = points = 0
    ids = {a.agent_id for a in agents}
    producers = set()
    for index, (result, output) in outputs.items():
        # The sandboxed run computed exactly what pi.py computes here.
        assert output == pi_reference(inputs[index])
        answer = json.loads(output)
        inside += answer["inside"]
        points += answer["points"]
        # Origin: which agent, which attempt; and that attempt was leased to that agent.
        assert result.agent_id in ids
        job_id = org.store.get_job_by_index(batch, index).job_id
        attempts = {a.attempt: a for a in org.store.list_attempts(job_id)}
        leased = attempts[result.attempt]
        assert leased.agent_id == result.agent_id
        assert leased.state is AttemptState.SUCCEEDED
        assert result.status == "ok" and result.counted
        assert result.output_sha256 == hashlib.sha256(output).digest()
        producers.add(result.agent_id)
    assert points == JOBS * POINTS
    estimate = 4 * inside / points
    p = math.pi / 4
    sigma = 4 * math.sqrt(p * (1 - p) / points)
    assert abs(estimate - math.pi) < 4 * sigma, (estimate, sigma)
    assert producers == ids, "every agent ran part of the batch"


async def test_a_result_of_several_megabytes_comes_back_whole(lab: Lab) -> None:
    """8 MiB is 6,991 RESULT chunks, more than the stream's 4,096-place queue: the
    agent feeds them in as the path takes them (it used to fail the job's upload)."""
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "big")
    await lab.run_agent(config, org)
    org.add_app("big", python_job("return hashlib.sha256(data).digest() * (1 << 18)"))
    batch = org.submit("big", [b"seed"], output_bytes=16 << 20)
    await org.wait_batch(batch, timeout=120)
    [(_result, output)] = org.outputs(batch).values()
    assert output == hashlib.sha256(b"seed").digest() * (1 << 18)
