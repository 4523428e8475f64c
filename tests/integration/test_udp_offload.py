"""Real agents and a real server with UDP GSO and GRO on (the default): a batch whose
code, inputs and outputs span many datagrams goes through trains both ways intact."""

from __future__ import annotations

import hashlib

import pytest

from tests.integration.conftest import PI_PY, Lab, pi_inputs, pi_reference, python_job

JOBS = 6


async def test_a_batch_goes_through_gso_trains_and_gro_reads(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    adapter = org.server.adapter
    assert adapter is not None
    if not (adapter.gso.active and adapter.gro.active):
        pytest.skip(f"no UDP offload here: gso {adapter.gso.reason}; gro {adapter.gro.reason}")
    await lab.run_agent(lab.agent_config(org, "offload"), org)
    # 300 kB of code and 200 kB inputs down, 128 kB outputs up: each many trains.
    code = python_job("return hashlib.sha256(data).digest() * 4096", pad=300_000)
    org.add_app("big", code)
    inputs = [bytes([i]) * 200_000 for i in range(JOBS)]
    batch = org.submit("big", inputs)
    org.add_app("pi", PI_PY)
    pi = pi_inputs(4, 10_000)
    pi_batch = org.submit("pi", pi)
    await org.wait_batch(batch, timeout=120)
    await org.wait_batch(pi_batch, timeout=120)

    outputs = org.outputs(batch)
    assert sorted(outputs) == list(range(JOBS))
    for index, (result, output) in outputs.items():
        assert result.status == "ok"
        assert output == hashlib.sha256(inputs[index]).digest() * 4096
    assert {i: out for i, (_, out) in org.outputs(pi_batch).items()} == {
        i: pi_reference(x) for i, x in enumerate(pi)
    }
    print(
        f"\nserver adapter: {adapter.trains_sent} GSO trains, {adapter.reads_coalesced} "
        f"coalesced reads, {adapter.datagrams_sent} datagrams sent, "
        f"{adapter.datagrams_received} received"
    )
    assert adapter.trains_sent > 0  # the code and inputs went out as trains
    assert adapter.reads_coalesced > 0  # the outputs came back as trains, split here
    assert adapter.datagrams_oversize == 0
