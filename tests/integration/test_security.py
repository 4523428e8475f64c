"""Security: untrusted agents get no code, and the server says exactly why.

Each test submits a batch first, so code is there to be had, and ends with the
agent holding no job, no lease issued to it, and the server's log naming the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from tests.integration.conftest import (
    PI_PY,
    Lab,
    LogRecorder,
    Org,
    pi_inputs,
    wait_until,
)
from tests.udpproxy import Direction
from vcomp.agent.measure import CODE_PCR
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import handshake as hs
from vcomp.protocol.messages import Attest, ErrorCode, decode_body
from vcomp.protocol.wire import HEADER_LEN, PacketType


async def org_with_work(lab: Lab) -> tuple[Org, int]:
    org = lab.org()
    await lab.start(org)
    org.add_app("pi", PI_PY)
    return org, org.submit("pi", pi_inputs(2, 1000))


def assert_no_code_left(org: Org, batch: int) -> None:
    """Nothing of the batch was ever leased: no agent received its code."""
    for rec in org.store.iter_results(batch):
        assert org.store.list_attempts(rec.job_id) == []
    assert org.server.stats.leases == 0


async def rejected(agent: LiteAgent) -> str:
    reasons: list[str] = await wait_until(lambda: agent.stats.rejected, "the agent to be rejected")
    await wait_until(agent.closed.is_set, "the agent's session to close")
    return reasons[0]


def server_reasons(logs: LogRecorder) -> Sequence[str]:
    return [e["reason"] for e in logs.events("handshake_rejected", logger="vcomp.server")]


async def test_modified_pcr17_gets_no_code(lab: Lab, logs: LogRecorder) -> None:
    org, batch = await org_with_work(lab)
    tpm = lab.lite_tpm(org, "patched")
    # A patched agent build: PCR 17 carries one more measurement than the golden value.
    tpm.extend(CODE_PCR, hashlib.sha256(b"a patched agent build").digest())
    agent = await lab.lite(tpm, org.address, org.fingerprint, org=org)

    assert await rejected(agent) == "measurement_not_allowed"
    assert server_reasons(logs) == ["measurement_not_allowed"]
    assert agent.stats.jobs == 0 and not agent.stats.connected_at
    assert_no_code_left(org, batch)


async def test_real_agent_whose_build_is_not_allowlisted(lab: Lab, logs: LogRecorder) -> None:
    org, batch = await org_with_work(lab)
    config = lab.agent_config(org, "agent", allow=False)
    # The allowlist holds another build of the agent: same policy, different code (PCR 17).
    org.allow(config.policy(), code=hashlib.sha256(b"another release").digest())
    agent = await lab.run_agent(config, org)

    events = await wait_until(
        lambda: logs.events("handshake_rejected", logger="vcomp.server"), "a rejection"
    )
    assert events[0]["reason"] == "measurement_not_allowed"
    assert events[0]["agent"] == agent.agent_id[:16]
    refused = await wait_until(
        lambda: logs.events("session_refused", logger="vcomp.agent"), "the agent to see it"
    )
    assert refused[0]["reason"] == "measurement_not_allowed"
    assert agent.runtime.workers[0].stats.jobs == 0
    assert_no_code_left(org, batch)


async def test_unenrolled_key_gets_no_code(lab: Lab, logs: LogRecorder) -> None:
    org, batch = await org_with_work(lab)
    stranger = lab.lite_tpm(org, "stranger", enroll=False)  # measured right, never enrolled
    agent = await lab.lite(stranger, org.address, org.fingerprint, org=org)

    assert await rejected(agent) == "unknown_key"
    # Refused at HELLO, before any session or quote check; counted, not logged per
    # datagram, so a stranger cannot fill the server's log.
    assert server_reasons(logs) == []
    assert org.server.endpoint is not None
    assert org.server.endpoint.counters["rejected_unknown_agent"] >= 1
    assert agent.stats.jobs == 0
    assert_no_code_left(org, batch)


class ReplayingTpm:
    """The attacker's 'TPM': answers every challenge with a quote captured earlier."""

    def __init__(self, agent_id: bytes, attest: Attest) -> None:
        self.agent_id = agent_id
        self._attest = attest
        self.challenges = 0

    def quote(self, extra: bytes, pcrs: Sequence[int]) -> tuple[bytes, bytes, list[bytes]]:
        self.challenges += 1
        a = self._attest
        return a.quote, a.signature, list(a.pcr_values)


async def test_replayed_quote_gets_no_code(lab: Lab, logs: LogRecorder) -> None:
    org = lab.org()
    await lab.start(org)
    proxy = await lab.proxy(org.address, capture=True)
    # A genuine agent handshakes through the proxy, which records its ATTEST.
    tpm = lab.lite_tpm(org, "victim")
    victim = await lab.lite(tpm, proxy.address, org.fingerprint, org=org)
    await wait_until(victim.connected.is_set, "the genuine agent to connect")
    captured = proxy.first(Direction.TO_SERVER, ptype=PacketType.ATTEST)
    attest = decode_body(PacketType.ATTEST, captured.data[HEADER_LEN:])
    assert isinstance(attest, Attest)
    await victim.stop()
    org.add_app("pi", PI_PY)
    batch = org.submit("pi", pi_inputs(2, 1000))

    # The attacker runs a fresh handshake (new cookie, new server nonce) and answers
    # the challenge with the victim's quote, signature, PCRs and ephemeral key.
    replay_tpm = ReplayingTpm(tpm.agent_id, attest)
    attacker_key, _ = hs.generate_ephemeral()  # it cannot have the victim's private key
    attacker = await lab.lite(
        replay_tpm, org.address, org.fingerprint, ephemeral=(attacker_key, attest.ephemeral)
    )

    assert await rejected(attacker) == "nonce_mismatch"
    assert replay_tpm.challenges == 1
    assert server_reasons(logs) == ["nonce_mismatch"]
    assert attacker.stats.jobs == 0 and not attacker.stats.connected_at
    assert_no_code_left(org, batch)


async def test_agent_refuses_a_server_with_the_wrong_key(lab: Lab, logs: LogRecorder) -> None:
    org, batch = await org_with_work(lab)
    impostor_pin = hashlib.sha256(b"the key the volunteer was told to pin").hexdigest()
    agent = await lab.run_agent(lab.agent_config(org, "agent", server_key=impostor_pin), org)

    refused = await wait_until(
        lambda: logs.events("session_refused", logger="vcomp.agent"), "the agent to refuse"
    )
    assert refused[0]["code"] == str(int(ErrorCode.SERVER_KEY_MISMATCH))
    assert refused[0]["reason"] == "server key does not match the pinned fingerprint"
    worker = agent.runtime.workers[0]
    assert worker.stats.jobs == 0 and worker.stats.sessions == 0
    assert "pinned" in worker.stats.last_reject
    # The server verified the agent and sent KEY, but never saw READY: no lease.
    assert logs.events("session_established", logger="vcomp.server") == []
    assert_no_code_left(org, batch)


class SelectiveTpm:
    """A genuine, enrolled AK whose owner chooses the PCR selection of every quote."""

    def __init__(self, tpm: SimulatedTpm, pcrs: Sequence[int]) -> None:
        self.agent_id = tpm.agent_id
        self._tpm = tpm
        self._pcrs = pcrs

    def quote(self, extra: bytes, pcrs: Sequence[int]) -> tuple[bytes, bytes, list[bytes]]:
        return self._tpm.quote(extra, self._pcrs)


@pytest.mark.parametrize("pcrs", [(18,), (17, 18, 23)])
async def test_quote_leaving_out_the_modified_pcr_gets_no_code(
    lab: Lab, logs: LogRecorder, pcrs: tuple[int, ...]
) -> None:
    """The server takes the selection from the quote (a real TPM's agent quotes PCR 23),
    so a patched agent might quote only the PCRs that still look right. Only selections
    an allowlisted measurement records are accepted."""
    org, batch = await org_with_work(lab)
    tpm = lab.lite_tpm(org, "patched")  # enrolled; the 17+18 golden is allowlisted
    tpm.extend(CODE_PCR, hashlib.sha256(b"a patched agent build").digest())
    agent = await lab.lite(SelectiveTpm(tpm, pcrs), org.address, org.fingerprint, org=org)

    assert await rejected(agent) == "pcr_selection_mismatch"
    assert server_reasons(logs) == ["pcr_selection_mismatch"]
    assert agent.stats.jobs == 0 and not agent.stats.connected_at
    assert_no_code_left(org, batch)
