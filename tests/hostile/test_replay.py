"""Replayed and reflected packets, sent from an on-path attacker's position.

Every session runs through a :class:`CaptureProxy`, so the test holds every
datagram of it and can send from the agent's address as the server sees it.
A datagram that was wrongly accepted would show up as an extra result, an
extra session, extra public-key work, a closed session or a changed epoch; each
test ends by running one more job through the same session, which also acts as
a barrier (the store commits in order, so any effect of the replays would be
visible by then).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from vcomp.loadgen import LiteAgent
from vcomp.protocol.wire import PacketType

from .capture import CaptureProxy
from .harness import (
    Org,
    Spoofer,
    add_batch,
    forgeries,
    hello_datagram,
    new_tpm,
    result_counts,
    start_org,
    taken_in,
    until,
    with_session_id,
)

PLAINTEXT = {PacketType.HELLO, PacketType.RETRY, PacketType.CHALLENGE, PacketType.ATTEST}
PLAINTEXT |= {PacketType.KEY, PacketType.REJECT}


async def _agent_via_proxy(org: Org) -> tuple[CaptureProxy, LiteAgent]:
    proxy = CaptureProxy(org.address)
    await proxy.start()
    agent = org.agent(proxy.address)
    established = org.server.stats.sessions_established
    await agent.start()
    # Established on both sides: the agent has the key, the server has its READY.
    await until(agent.connected.is_set, 20, "the agent to connect")
    await until(lambda: org.server.stats.sessions_established > established, 20, "READY")
    return proxy, agent


async def _run_one_job(org: Org, agent: LiteAgent, tag: str) -> int:
    """A job through ``agent``'s session, waited for until durably committed."""
    batch = add_batch(org.store, 1, tag=tag)
    committed = agent.stats.committed
    await until(lambda: agent.stats.committed > committed, 20, f"job {tag}")
    assert org.store.batch_status(batch).done == 1
    return batch


Sender = Callable[[bytes], object]


async def _deliver(org: Org, sends: Sequence[tuple[Sender, bytes]], expect: int) -> None:
    """Send, then wait until the server has taken in ``expect`` more datagrams."""
    target = org.endpoint.counters["datagrams_in"] + expect
    for sender, datagram in sends:
        sender(datagram)
    await taken_in(org, target)


async def test_replay_inside_the_same_session_has_no_effect(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy, agent = await _agent_via_proxy(org)
    try:
        first = await _run_one_job(org, agent, "original")
        second = await _run_one_job(org, agent, "original-2")
        captured = list(proxy.to_server_log)
        types = Counter(PacketType(d[3]).name for d in captured)
        assert {"HELLO", "ATTEST", "READY", "RESULT", "ACK"} <= types.keys(), types
        results = result_counts(org.store, first) | result_counts(org.store, second)
        assert set(results.values()) == {1}
        counters, stats = Counter(org.endpoint.counters), org.server.stats
        committed, established = stats.results_committed, stats.sessions_established
        assert agent.session is not None
        session = org.endpoint.sessions[agent.session.session_id]

        # Everything the agent ever sent, from its own address: in order, then reversed.
        replay = captured + captured[::-1]
        await _deliver(org, [(proxy.to_server, d) for d in replay], len(replay))

        await _run_one_job(org, agent, "after-replay")  # the barrier
        assert result_counts(org.store, first) | result_counts(org.store, second) == results
        assert stats.results_committed == committed + 1  # the barrier job only
        assert stats.sessions_established == established
        after = org.endpoint.counters
        assert after["sessions_created"] == counters["sessions_created"]
        assert after["public_key_ops"] == counters["public_key_ops"]
        assert session.channel is not None and session.channel.epoch == 0
        assert agent.ready and not agent.stats.closed
        print(f"\nreplay: {len(replay)} replayed datagrams {dict(types)} x2, no effect")
    finally:
        await agent.stop()
        proxy.close()
        await org.server.stop()


async def test_replay_into_a_new_session_is_dropped(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    old_proxy, old_agent = await _agent_via_proxy(org)
    proxy, agent = None, None
    try:
        first = await _run_one_job(org, old_agent, "old-session")
        await old_agent.stop()
        await until(lambda: not org.endpoint.sessions, 10, "the old session to close")
        captured = list(old_proxy.to_server_log)

        proxy, agent = await _agent_via_proxy(org)
        assert agent.session is not None
        new_sid = agent.session.session_id
        counters, stats = Counter(org.endpoint.counters), org.server.stats
        rejected, established = stats.handshakes_rejected, stats.sessions_established

        # (a) verbatim, from the old session's address: nothing finds the old session;
        #     its cookie HELLO may open a fresh handshake there, which goes nowhere.
        await _deliver(org, [(old_proxy.to_server, d) for d in captured], len(captured))
        # (b) re-addressed to the new session, from the new session's address.
        moved = [d if d[3] == PacketType.HELLO else with_session_id(d, new_sid) for d in captured]
        await _deliver(org, [(proxy.to_server, d) for d in moved], len(moved))
        # (c) an on-path attacker also saw the CHALLENGE of the handshake (a) opened:
        #     the old ATTEST moved into it fails, its quote is bound to the old nonce.
        reopened = {
            int.from_bytes(d[6:14], "big")
            for d in old_proxy.to_agent_log
            if d[3] == PacketType.CHALLENGE
        } - {int.from_bytes(d[6:14], "big") for d in captured if d[3] == PacketType.ATTEST}
        attest = next(d for d in captured if d[3] == PacketType.ATTEST)
        sends = [(old_proxy.to_server, with_session_id(attest, sid)) for sid in reopened]
        await _deliver(org, sends, len(sends))

        second = await _run_one_job(org, agent, "new-session")  # the barrier
        after = org.endpoint.counters
        created = after["sessions_created"] - counters["sessions_created"]
        print(
            f"\nreplay into a new session: {len(captured)} datagrams x2; handshakes the "
            f"replayed cookie HELLO reopened: {created}; their forged ATTESTs rejected: "
            f"{stats.handshakes_rejected - rejected}"
        )
        assert stats.sessions_established == established
        assert created == len(reopened) <= 1
        assert stats.handshakes_rejected - rejected == len(reopened)
        # The only public-key work is verifying (and refusing) that forged ATTEST.
        assert after["public_key_ops"] - counters["public_key_ops"] == len(reopened)
        assert result_counts(org.store, first) == {j: 1 for j in result_counts(org.store, first)}
        assert set(result_counts(org.store, second).values()) == {1}
        channel = org.endpoint.sessions[new_sid].channel
        assert channel is not None and channel.epoch == 0
        assert agent.ready and not agent.stats.closed
    finally:
        if agent is not None:
            await agent.stop()
        for p in (old_proxy, proxy):
            if p is not None:
                p.close()
        await org.server.stop()


async def test_reflected_server_packets_have_no_effect(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy, agent = await _agent_via_proxy(org)
    outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    outsider.bind(("127.0.0.1", 0))
    spoofer = Spoofer.open()
    try:
        first = await _run_one_job(org, agent, "original")
        reflected = list(proxy.to_agent_log)  # the server's own packets
        types = Counter(PacketType(d[3]).name for d in reflected)
        assert {"RETRY", "CHALLENGE", "KEY", "START", "CODE", "END", "ACK"} <= types.keys()
        counters, stats = Counter(org.endpoint.counters), org.server.stats
        committed = stats.results_committed
        assert agent.session is not None
        session = org.endpoint.sessions[agent.session.session_id]
        failed_before = forgeries(session.channel)

        senders: list[Sender] = [proxy.to_server, lambda d: outsider.sendto(d, org.address)]
        if spoofer is not None:
            # A true reflection: the datagram arrives from the server's own address.
            senders.append(lambda d: spoofer.send(d, org.address, org.address))
        await _deliver(org, [(s, d) for s in senders for d in reflected], len(reflected) * 3)
        if spoofer is not None:
            # A HELLO "from" the server itself: its RETRY goes to itself and dies there.
            hello = hello_datagram(org.tpm.agent_id, bytes(32))
            await _deliver(org, [(lambda d: spoofer.send(d, org.address, org.address), hello)], 2)

        await _run_one_job(org, agent, "after-reflection")  # the barrier
        after = org.endpoint.counters
        plain = sum(1 for d in reflected if PacketType(d[3]) in PLAINTEXT)
        delta = {k: after[k] - counters[k] for k in after if after[k] != counters[k]}
        rejected_by_aead = forgeries(session.channel) - failed_before
        print(
            f"\nreflection: {len(reflected)} server datagrams {dict(types)} sent back from "
            f"{len(senders)} sources (raw spoofing {'on' if spoofer else 'unavailable'}); "
            f"counter deltas {delta}; AEAD failures {rejected_by_aead}"
        )
        # Plaintext handshake packets of the server's are refused by type, before parsing.
        extra = 1 if spoofer is not None else 0  # the RETRY the server sent itself
        assert delta["dropped_unexpected"] == plain * len(senders) + extra
        # Encrypted ones are sealed for the other direction: replayed or failing the AEAD.
        assert 0 < rejected_by_aead <= (len(reflected) - plain) * len(senders)
        assert stats.results_committed == committed + 1
        assert set(result_counts(org.store, first).values()) == {1}
        assert after["sessions_created"] == counters["sessions_created"]
        assert after["public_key_ops"] == counters["public_key_ops"]
        assert session.address == proxy.upstream_address  # not moved by a reflection
        assert session.channel is not None and session.channel.epoch == 0
        assert agent.ready and not agent.stats.closed
    finally:
        outsider.close()
        if spoofer is not None:
            spoofer.close()
        await agent.stop()
        proxy.close()
        await org.server.stop()
