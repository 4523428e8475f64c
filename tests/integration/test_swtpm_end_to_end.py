"""End to end on a real software TPM: `vcomp-agent init --tpm swtpm:...`, the manual
enrolment line (it carries the AK made inside swtpm), a pi batch over real UDP, quotes
made by swtpm and verified by the server. The swtpm is manufactured with an EK
certificate from a local CA; EK-based enrolment that uses it is the next round."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import swtpm
from tests.integration.conftest import (
    PI_PY,
    AgentHandle,
    Lab,
    LogRecorder,
    free_udp_port,
    pi_inputs,
    pi_reference,
    run_cli,
    wait_until,
)
from vcomp.agent.config import AgentConfig, load_agent_config
from vcomp.agent.enrolment import parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.runtime import AgentRuntime
from vcomp.errors import ConfigError
from vcomp.protocol.attestation import Measurement
from vcomp.server.config import STORE_FILE, init_server_home
from vcomp.server.store.sqlite import SqliteStore

JOBS = 6
POINTS = 20_000
AGENT_CLI = str(Path(sys.executable).with_name("vcomp-agent"))


@pytest.fixture
def sw(tmp_path: Path) -> Iterator[swtpm.Swtpm]:
    swtpm.require()
    with swtpm.running_swtpm(tmp_path / "swtpm-state", ek=True) as running:
        yield running


def init_swtpm_agent(lab: Lab, sw: swtpm.Swtpm, server: str, fingerprint: str) -> AgentConfig:
    home = lab.root / "tss-agent"
    args = [AGENT_CLI, "init", str(home), "--name", "tss-agent", "--server", server]
    run_cli([*args, "--server-key", fingerprint, "--tpm", sw.spec.format()])
    config = load_agent_config(home)
    assert config.tpm == sw.spec.format()
    return dataclasses.replace(config, mode="full")


def enrol(config: AgentConfig) -> tuple[str, Measurement]:
    line = run_cli([AGENT_CLI, "enrolment", "--line", "--config", str(config.home)]).stdout
    measured = run_cli([AGENT_CLI, "measure", "--config", str(config.home)]).stdout
    return line.strip(), Measurement.parse(measured)


async def test_pi_batch_with_quotes_from_swtpm(lab: Lab, sw: swtpm.Swtpm) -> None:
    org = lab.org()
    await lab.start(org)
    config = init_swtpm_agent(lab, sw, org.server_str, org.fingerprint)
    line, golden = enrol(config)
    # The golden measurement is PCR 23's, not the simulated 17+18 one.
    assert golden == golden_measurement(config.policy(), pcrs=(23,))
    assert golden.format().startswith("sha256:23=")
    e = parse_enrolment(line)
    org.store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
    org.store.allow_measurement(golden.format(), "swtpm agent")

    agent = await lab.run_agent(config, org)
    await wait_until(lambda: agent.connected_sessions, "the swtpm agent to attest")
    # The server accepted a quote whose clock is swtpm's (resetCount from the real TPM).
    verified_clock = org.server.trust.clocks[bytes.fromhex(e.agent_id)]
    assert verified_clock.reset_count >= 1 and verified_clock.clock > 0
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(JOBS, POINTS)
    batch = org.submit("pi", inputs)
    await org.wait_batch(batch, timeout=120)
    outputs = org.outputs(batch)
    assert sorted(outputs) == list(range(JOBS))
    for index, (result, output) in outputs.items():
        assert output == pi_reference(inputs[index])
        assert result.agent_id == e.agent_id and result.counted
    assert sum(json.loads(o)["points"] for _, o in outputs.values()) == JOBS * POINTS


async def test_swtpm_agent_with_only_the_simulated_golden_gets_no_code(
    lab: Lab, sw: swtpm.Swtpm, logs: LogRecorder
) -> None:
    """The organisation allowlisted only the 17+18 golden: the PCR 23 quote is refused
    (no allowlisted measurement records that selection) and no job is leased."""
    org = lab.org()
    await lab.start(org)
    org.add_app("pi", PI_PY)
    batch = org.submit("pi", pi_inputs(2, POINTS))
    config = init_swtpm_agent(lab, sw, org.server_str, org.fingerprint)
    line, _ = enrol(config)
    e = parse_enrolment(line)
    org.store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
    org.store.allow_measurement(golden_measurement(config.policy()).format(), "17+18 only")
    agent = await lab.run_agent(config, org)

    events = await wait_until(
        lambda: logs.events("handshake_rejected", logger="vcomp.server"), "a rejection"
    )
    assert events[0]["reason"] == "pcr_selection_mismatch"
    assert events[0]["agent"] == agent.agent_id[:16]
    assert agent.runtime.workers[0].stats.jobs == 0
    for rec in org.store.iter_results(batch):
        assert org.store.list_attempts(rec.job_id) == []
    assert org.server.stats.leases == 0


async def test_tpm_reset_under_a_running_agent_stops_it_with_one_line(
    lab: Lab, sw: swtpm.Swtpm, logs: LogRecorder
) -> None:
    """swtpm is reset while the agent runs (on hardware a reset is a reboot): the AK is
    unloaded and PCR 23 cleared. At its next handshake the agent stops, saying why,
    instead of retrying a quote that cannot succeed."""
    home = lab.root / "srv"
    fingerprint = init_server_home(home)
    port = free_udp_port()
    text = (home / "server.toml").read_text().replace("127.0.0.1:7461", f"127.0.0.1:{port}")
    (home / "server.toml").write_text(text)
    config = init_swtpm_agent(lab, sw, f"127.0.0.1:{port}", fingerprint)
    line, golden = enrol(config)
    e = parse_enrolment(line)
    with SqliteStore(home / STORE_FILE) as store:
        store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
        store.allow_measurement(golden.format(), "swtpm agent")
    first, _ = await lab.serve(home, "serve1")
    runtime = AgentRuntime(config, shutdown_grace=1.0)
    agent = AgentHandle(config, runtime, asyncio.ensure_future(runtime.run()), e.agent_id)

    async def stop() -> None:  # the run ends in the ConfigError this test expects
        runtime.stop()
        with contextlib.suppress(ConfigError):
            await asyncio.wait_for(agent.task, 15)

    lab.on_close(stop)
    await wait_until(lambda: agent.connected_sessions, "the swtpm agent to attest")

    sw.reset()
    first.signal(signal.SIGTERM)  # a clean stop: the agent hears SERVER_SHUTDOWN
    assert await first.wait(30) == 0
    await lab.serve(home, "serve2")

    with pytest.raises(ConfigError, match="the TPM could not quote"):
        await asyncio.wait_for(asyncio.shield(agent.task), 60)
    assert logs.events("tpm_failed", logger="vcomp.agent")
