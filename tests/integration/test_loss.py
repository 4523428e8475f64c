"""Loss: every job completes, correctly, through a proxy that drops, duplicates,
reorders and corrupts datagrams in both directions (window 1 and the default window).

Sizes are small on purpose: with 20% loss each way a round trip fails 36% of the
time, and RFC 6298 backoff (0.2 s minimum RTO, doubling) makes stop-and-wait slow
with a heavy tail, about 0.26 s per reliable message on average.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import (
    PI_PY,
    Lab,
    Org,
    assert_results_unique,
    echo_reference,
    pi_inputs,
    pi_reference,
    wait_until,
)
from tests.udpproxy import Faults, UdpProxy

HOSTILE = Faults(drop=0.2, duplicate=0.05, reorder=0.1, corrupt=0.03)
DEFAULT_WINDOW = None  # the server config's window (64)


def assert_network_misbehaved(proxy: UdpProxy) -> None:
    """The faults really happened (else the test proves nothing)."""
    both = proxy.stats.to_server + proxy.stats.to_agent
    for fault in ("dropped", "duplicated", "reordered", "corrupted"):
        assert both[fault] > 0, (fault, proxy.stats)
    for stats in (proxy.stats.to_server, proxy.stats.to_agent):
        assert stats["dropped"] > 0, proxy.stats


async def hostile_org(lab: Lab, window: int | None, seed: int) -> tuple[Org, UdpProxy]:
    # A session that gives up (12 timeouts in a row) frees its lease within ~25 s.
    org = lab.org(window=window, lease_seconds=5, idle_timeout=20)
    await lab.start(org)
    proxy = await lab.proxy(org.address, to_server=HOSTILE, to_agent=HOSTILE, seed=seed)
    return org, proxy


@pytest.mark.parametrize(
    ("window", "code_size", "jobs"),
    [
        pytest.param(1, 3000, 6, marks=pytest.mark.slow, id="window1"),
        pytest.param(DEFAULT_WINDOW, 30_000, 12, id="default_window"),
    ],
)
async def test_lite_agents_complete_every_job(
    lab: Lab, window: int | None, code_size: int, jobs: int
) -> None:
    org, proxy = await hostile_org(lab, window, seed=11 if window == 1 else 12)
    # Several CODE packets per job (25 with the default window, so it fills up).
    code = org.add_app("echo", b"#" * code_size)
    inputs = [f"input {i}".encode() * 50 for i in range(jobs)]
    batch = org.submit("echo", inputs)
    tpms = [lab.lite_tpm(org, f"lite{i}") for i in range(4)]
    await org.synced()
    agents = [lab.reconnecting_lite(tpm, proxy.address, org.fingerprint) for tpm in tpms]

    await org.wait_batch(batch, timeout=240)

    outputs = org.outputs(batch)
    assert {i: out for i, (_, out) in outputs.items()} == {
        i: echo_reference(code, data) for i, data in enumerate(inputs)
    }
    assert_results_unique(org.store, batch)
    assert sum(a.jobs for a in agents) >= len(inputs)
    assert_network_misbehaved(proxy)


async def test_real_agents_complete_every_job(lab: Lab) -> None:
    """Three sandboxed agents, pi.py, the default window."""
    org, proxy = await hostile_org(lab, DEFAULT_WINDOW, seed=22)
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(10, 20_000, seed0=100)
    batch = org.submit("pi", inputs)
    for i in range(3):
        await lab.run_agent(lab.agent_config(org, f"agent{i}", server=proxy.address), org)

    await org.wait_batch(batch, timeout=240)

    outputs = org.outputs(batch)
    for index, (_, output) in outputs.items():
        assert output == pi_reference(inputs[index])
    assert_results_unique(org.store, batch)
    assert_network_misbehaved(proxy)


async def test_every_commit_is_confirmed_to_the_agent(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    proxy = await lab.proxy(org.address, to_agent=Faults(drop=0.2), seed=31)
    org.add_app("echo", b"tiny job")
    tpm = lab.lite_tpm(org, "lite")
    agent = await lab.lite(tpm, proxy.address, org.fingerprint, org=org)
    batch = org.submit("echo", [b"%d" % i for i in range(40)])
    await org.wait_batch(batch, timeout=120)

    await wait_until(lambda: agent.stats.committed == 40, "every commit confirmed", 5)
