"""Tampering: every single-bit flip of an encrypted packet, and forged RESETs.

Bit flips: the proxy holds back the agent's packets from the moment the server
sends END, so the agent's RESULT has never reached the server. Each of its
8 x length single-bit variants is then sent from the agent's own address, and
each must be dropped, by the counter that the spec (PROTOCOL.md 3.1) predicts
for it. Finally the held, unaltered packets are released and the job commits:
the packet that was flipped would have had an effect.

Forged RESET: a real :class:`AgentSession` holds a running job while the test,
sending as the server, injects RESETs made without the session key (random
bodies, a RESET sealed under a wrong key, real ciphertext re-labelled as RESET,
plaintext RESET/ERROR/REJECT). The agent must keep its job, state and epoch;
a genuine RESET afterwards shows the agent would have reacted to a real one.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentState
from vcomp.protocol.messages import Error, ErrorCode, Reject, Reset, encode_body
from vcomp.protocol.record import Direction, RecordKey
from vcomp.protocol.wire import PacketType

from .capture import CaptureProxy
from .fuzzgen import header, packet
from .harness import (
    HoldingAgent,
    add_batch,
    forgeries,
    new_tpm,
    packet_number,
    start_org,
    taken_in,
    until,
)

KNOWN_TYPES = {int(t) for t in PacketType}
PLAINTEXT_ONLY = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06}
ENCRYPTED_ONLY = {0x07, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x20, 0x21}


def predicted_drop(d: bytes, session_id: int, seen: set[int]) -> str:
    """Which check of PROTOCOL.md 3.1 (or of record.md) throws ``d`` away."""
    if not 24 <= len(d) <= 1472 or d[:3] != b"VC\x03" or d[5] != 0:
        return "dropped_malformed"
    if d[4] not in (0, 1) or d[3] not in KNOWN_TYPES:
        return "dropped_malformed"
    if int.from_bytes(d[22:24], "big") != len(d) - 24:
        return "dropped_malformed"
    encrypted = d[4] == 1
    if (encrypted and d[3] in PLAINTEXT_ONLY) or (not encrypted and d[3] in ENCRYPTED_ONLY):
        return "dropped_malformed"
    sid = int.from_bytes(d[6:14], "big")
    if sid == 0 or not encrypted:
        return "dropped_unexpected"
    if sid != session_id:
        return "dropped_unknown_session"
    return "replayed" if packet_number(d) in seen else "forgeries"


async def test_every_bit_flip_of_an_encrypted_packet_is_dropped(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy = CaptureProxy(org.address)
    await proxy.start()
    agent = org.agent(proxy.address)
    try:
        await agent.start()
        await until(agent.connected.is_set, 20, "the agent to connect")
        proxy.hold_after = PacketType.END  # from here on nothing of the agent's gets through
        batch = add_batch(org.store, 1, tag="flip")
        await until(lambda: any(d[3] == PacketType.RESULT for d in proxy.held), 20, "the RESULT")
        target = next(d for d in proxy.held if d[3] == PacketType.RESULT)
        assert agent.session is not None
        sid = agent.session.session_id
        session = org.endpoint.sessions[sid]
        assert session.channel is not None
        # Packet numbers the server's replay window has accepted (encrypted ones only).
        seen = {packet_number(d) for d in proxy.to_server_log if d[4] == 1}
        assert packet_number(target) not in seen

        flips = []
        for bit in range(len(target) * 8):
            flipped = bytearray(target)
            flipped[bit // 8] ^= 0x80 >> (bit % 8)
            flips.append(bytes(flipped))
        predicted = Counter(predicted_drop(d, sid, seen) for d in flips)
        before = Counter(org.endpoint.counters)
        failed_before = forgeries(session.channel)
        target_in = before["datagrams_in"] + len(flips)
        for i in range(0, len(flips), 64):
            for d in flips[i : i + 64]:
                proxy.to_server(d)
            await taken_in(org, before["datagrams_in"] + min(i + 64, len(flips)))
        assert org.endpoint.counters["datagrams_in"] >= target_in
        after = org.endpoint.counters
        observed = {
            k: after[k] - before[k]
            for k in ("dropped_malformed", "dropped_unknown_session", "dropped_unexpected")
        }
        observed["forgeries"] = forgeries(session.channel) - failed_before
        print(
            f"\nbit flips: {len(flips)} variants of a {len(target)}-byte RESULT; predicted "
            f"{dict(predicted)}; observed {observed}"
        )
        for reason in ("dropped_malformed", "dropped_unknown_session", "dropped_unexpected"):
            assert observed[reason] == predicted[reason], reason
        assert observed["forgeries"] == predicted["forgeries"]
        assert predicted["forgeries"] > len(flips) // 2  # most reach, and fail, the AEAD
        # None of them had any effect: no result, the session is alive and unchanged.
        assert org.store.batch_status(batch).done == 0
        assert org.server.stats.results_committed == 0
        assert session.close_reason is None and session.channel.epoch == 0

        # The control: the unaltered packets, released, finish the job.
        proxy.hold_after = None
        proxy.release()
        await until(lambda: org.store.batch_status(batch).done == 1, 20, "the released result")
        await until(lambda: agent.stats.committed == 1, 20, "the final ACK")
    finally:
        await agent.stop()
        proxy.close()
        await org.server.stop()


def _forged_resets(sid: int, server_packets: list[bytes], rng: random.Random) -> list[bytes]:
    """RESETs an attacker can make without the key; all must fail the agent's AEAD."""
    top = max(packet_number(d) for d in server_packets)
    out = []
    # Sealed properly, but under a key of the attacker's own, at the next numbers.
    wrong = RecordKey(os.urandom(32), send=Direction.SERVER_TO_AGENT)
    for i, epoch in enumerate((1, 2, 0xFFFFFFFF)):
        body = encode_body(Reset(epoch=epoch, reason="forged"))
        head = header(PacketType.RESET, 1, sid, top + 1 + i, len(body) + 16)
        out.append(head + wrong.seal(head, top + 1 + i, body))
    # Random ciphertext of plausible sizes.
    for i in range(40):
        body = rng.randbytes(rng.randint(17, 120))
        out.append(packet(PacketType.RESET, 1, sid, top + 100 + i, body))
    # Real ciphertext from this session, re-labelled RESET at a fresh number.
    for i, d in enumerate(server_packets):
        relabelled = bytearray(d)
        relabelled[3] = PacketType.RESET
        relabelled[14:22] = (top + 1000 + i).to_bytes(8, "big")
        out.append(bytes(relabelled))
    return out


async def test_forged_reset_does_not_disturb_the_agent(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy = CaptureProxy(org.address)
    await proxy.start()
    agent = HoldingAgent(org, org.tpm, proxy.address)
    try:
        await agent.start()
        await until(lambda: bool(agent.of_type(ev.Connected)), 20, "the agent to connect")
        batch = add_batch(org.store, 1, tag="held")
        await until(lambda: bool(agent.jobs), 20, "the job to arrive")
        session = agent.session
        assert session is not None and session.channel is not None
        assert session.state is AgentState.RUNNING
        sid = session.session_id
        server_packets = [d for d in proxy.to_agent_log if d[4] == 1]
        forged = _forged_resets(sid, server_packets, random.Random(0xBAD))
        plain = [
            packet(PacketType.RESET, 0, sid, 7, encode_body(Reset(epoch=1, reason="forged"))),
            packet(
                PacketType.ERROR,
                0,
                sid,
                8,
                encode_body(Error(code=ErrorCode.INTERNAL, message="forged")),
            ),
            packet(
                PacketType.REJECT,
                0,
                sid,
                9,
                encode_body(Reject(code=ErrorCode.BUSY, reason="forged")),
            ),
            packet(
                PacketType.REJECT,
                0,
                0,
                0,
                encode_body(Reject(code=ErrorCode.BUSY, reason="forged")),
            ),
        ]
        replays = server_packets  # verbatim: stopped by the replay window
        failed_before = forgeries(session.channel)
        events_before = len(agent.events)

        for d in plain + replays + forged:
            proxy.to_agent(d)
        # All forged ciphertext reached the AEAD and failed there (and was sent last).
        await until(
            lambda: forgeries(session.channel) - failed_before == len(forged),
            10,
            "the agent to reject the forgeries",
        )
        print(
            f"\nforged RESET: {len(forged)} forged ciphertexts, {len(plain)} plaintext "
            f"forgeries, {len(replays)} replays sent to the agent as the server; agent "
            f"state {session.state.value}, epoch {session.channel.epoch}"
        )
        assert agent.events[events_before:] == []
        assert session.state is AgentState.RUNNING
        assert session.channel.epoch == 0 and session.channel.close_reason is None
        for kind in (ev.ResetReceived, ev.JobAborted, ev.SessionClosed, ev.Rejected):
            assert agent.of_type(kind) == []

        # The agent still has its job, finishes it, and the server records it.
        agent.finish(agent.jobs[0])
        await until(lambda: bool(agent.of_type(ev.ResultCommitted)), 20, "the final ACK")
        assert org.store.batch_status(batch).done == 1

        # Control: a genuine RESET (asked for by the operator) does reach the agent.
        org.store.request_reset(org.tpm.agent_id.hex())
        await until(lambda: bool(agent.of_type(ev.ResetReceived)), 20, "a genuine RESET")
        assert session.channel.epoch == 1
    finally:
        agent.close()
        proxy.close()
        await org.server.stop()
