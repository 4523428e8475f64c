"""A malicious organisation impersonator, against a real volunteer agent.

The agent (a real :class:`AgentRuntime`, with its sandbox) pinned organisation
A's key but is pointed at server B: a real :class:`OrganisationServer` with a
key of its own, which has enrolled the agent, allow-listed its measurement and
queued a job, so it attests the agent and sends a correctly signed KEY like any
honest server. The agent must refuse B at the key check and never run B's code.
The control runs the same agent pinned to B, and B's job does run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from vcomp.agent.config import AgentConfig, init_agent_home
from vcomp.agent.runtime import AgentRuntime
from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol.messages import ErrorCode, Key, decode_body, encode_plaintext_packet
from vcomp.protocol.wire import HEADER_LEN, PacketType, unpack_header

from .capture import CaptureProxy
from .harness import Org, add_batch, make_server_home, new_tpm, start_org, until

# B's job: if it ever ran, the agent would log job_started and return this output.
JOB = b"from vcomp.guest import run\nrun(lambda data, progress: b'impostor code ran: ' + data)\n"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def events(self, name: str) -> list[str]:
        return [line for line in self.lines if line.startswith(f"event={name} ")]


@contextlib.contextmanager
def _agent_log() -> Iterator[_Lines]:
    logger = logging.getLogger("vcomp.agent")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def _server_b(tmp_path: Path, pin: str | None) -> tuple[Org, AgentConfig]:
    """Server B, and an agent home pointed at it and pinned to ``pin`` (default: B)."""
    home = tmp_path / "agent"
    config = init_agent_home(home, name="volunteer")
    tpm = SimulatedTpm.open(config.tpm_dir)  # the runtime does the measured launch
    org = await start_org(tmp_path, tpm, policy=config.policy(), name="server-b", code=JOB)
    host, port = org.address
    server_key = pin or org.fingerprint.hex()
    config = dataclasses.replace(config, servers=(f"{host}:{port}",), server_key=server_key)
    return org, dataclasses.replace(config, mode="full")


async def _run(config: AgentConfig, done: Callable[[AgentRuntime], bool]) -> AgentRuntime:
    """Run a real agent (sandbox and all) until ``done``, then shut it down."""
    runtime = AgentRuntime(config, shutdown_grace=1.0)
    task = asyncio.ensure_future(runtime.run())
    try:
        await until(lambda: done(runtime), 30, "the agent")
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 20)
    return runtime


async def test_agent_pinned_to_a_never_runs_code_from_server_b(tmp_path: Path) -> None:
    attempts = 2  # the agent retries after backing off; it must refuse every time
    fingerprint_a = make_server_home(tmp_path / "server-a")  # A's key: all the agent knows
    org_b, config = await _server_b(tmp_path, pin=fingerprint_a)
    assert org_b.fingerprint.hex() != fingerprint_a
    batch = add_batch(org_b.store, 1, tag="impostor")
    try:
        with _agent_log() as log:
            runtime = await _run(config, lambda rt: rt.workers[0].stats.rejected >= attempts)
        worker = runtime.workers[0]
        counters = org_b.endpoint.counters
        print(
            f"\nimpersonator: agent refused server B {worker.stats.rejected} times "
            f"({worker.stats.last_reject!r}); B verified {counters['public_key_ops']} "
            f"attestations and sent its KEY; agent jobs {worker.stats.jobs}, "
            f"job_started lines {len(log.events('job_started'))}"
        )
        # B did its part perfectly: it attested the agent and answered with a signed KEY.
        assert counters["public_key_ops"] >= attempts
        assert org_b.server.stats.handshakes_rejected == 0
        # The agent refused at the pinned-key check, every time, and ran nothing.
        assert "pinned" in worker.stats.last_reject
        refusals = log.events("session_refused")
        assert len(refusals) >= attempts
        assert all(f"code={int(ErrorCode.SERVER_KEY_MISMATCH)} " in line for line in refusals)
        assert worker.stats.sessions == 0 and worker.stats.jobs == 0
        assert log.events("session_established") == []
        assert log.events("job_started") == [] and log.events("job_finished") == []
        assert len(runtime.spool) == 0
        # B never got a READY, so it never leased, sent or heard back about its job.
        assert org_b.server.stats.sessions_established == 0
        assert org_b.server.stats.leases == 0
        status = org_b.store.batch_status(batch)
        assert (status.queued, status.leased, status.done) == (1, 0, 0)
    finally:
        await org_b.server.stop()


async def test_control_the_same_agent_pinned_to_b_runs_b_code(tmp_path: Path) -> None:
    org_b, config = await _server_b(tmp_path, pin=None)
    batch = add_batch(org_b.store, 1, tag="control")
    try:
        with _agent_log() as log:
            runtime = await _run(config, lambda rt: rt.workers[0].stats.committed >= 1)
        assert runtime.workers[0].stats.jobs == 1
        assert len(log.events("job_started")) == 1
        assert org_b.store.batch_status(batch).done == 1
        (record,) = list(org_b.store.iter_results(batch))
        assert record.result is not None and record.result.status == "ok"
    finally:
        await org_b.server.stop()


async def _signed_key_of(tmp_path: Path) -> tuple[str, Key]:
    """Organisation A's fingerprint, and a KEY it really signed (for another session)."""
    org_a = await start_org(tmp_path, new_tpm(tmp_path / "lite-tpm"), name="server-a")
    spy = CaptureProxy(org_a.address)
    await spy.start()
    lite = org_a.agent(spy.address)
    try:
        await lite.start()
        await until(lite.connected.is_set, 20, "a session with A")
    finally:
        await lite.stop()
        spy.close()
        await org_a.server.stop()
    datagram = next(d for d in spy.to_agent_log if d[3] == PacketType.KEY)
    key = decode_body(PacketType.KEY, datagram[HEADER_LEN:])
    assert isinstance(key, Key)
    return org_a.fingerprint.hex(), key


async def test_server_b_replaying_a_key_and_signature_of_a_is_refused(tmp_path: Path) -> None:
    """B (with an on-path helper) puts A's public key and a signature A made into its KEY."""
    fingerprint_a, key_a = await _signed_key_of(tmp_path)
    org_b, config = await _server_b(tmp_path, pin=fingerprint_a)
    batch = add_batch(org_b.store, 1, tag="impostor")
    swapped: list[int] = []

    def wear_a_key(datagram: bytes) -> bytes:
        if datagram[3] != PacketType.KEY:
            return datagram
        header = unpack_header(datagram)
        key = decode_body(PacketType.KEY, datagram[HEADER_LEN:])
        assert isinstance(key, Key)
        forged = dataclasses.replace(key, server_key=key_a.server_key, signature=key_a.signature)
        swapped.append(header.session_id)
        return encode_plaintext_packet(forged, header.session_id, header.packet_number)

    mitm = CaptureProxy(org_b.address)
    await mitm.start()
    mitm.rewrite_to_agent = wear_a_key
    host, port = mitm.address
    config = dataclasses.replace(config, servers=(f"{host}:{port}",))
    try:
        with _agent_log() as log:
            runtime = await _run(config, lambda rt: rt.workers[0].stats.rejected >= 1)
        worker = runtime.workers[0]
        print(f"\nimpersonator with A's key and signature: refused ({worker.stats.last_reject!r})")
        assert swapped, "B never sent a KEY"
        # The key now matches the pin, so it is the signature check that refuses it.
        assert worker.stats.last_reject == "server signature over the handshake is invalid"
        assert worker.stats.sessions == 0 and worker.stats.jobs == 0
        assert log.events("job_started") == []
        assert org_b.server.stats.leases == 0
        assert org_b.store.batch_status(batch).queued == 1
    finally:
        mitm.close()
        await org_b.server.stop()
