"""A hostile peer that shapes its datagrams for the server's UDP GRO.

It sends GSO trains the kernel hands the server coalesced: valid padded HELLOs cut
at their exact size with a short garbage tail, trains of odd segment sizes, and
segments longer than any datagram the protocol allows. Judged by what the server
did: every HELLO (and only those) got its RETRY, every datagram was seen exactly
once as sent, the oversize ones were dropped before the core, and a genuine agent
still gets its job done.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import pytest

from vcomp import udp_offload
from vcomp.protocol.wire import HEADER_LEN, PacketType, unpack_header
from vcomp.transport import MAX_DATAGRAM

from .harness import add_batch, hello_datagram, new_tpm, start_org, taken_in, until


async def test_coalesced_trains_are_split_exactly_as_sent(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    adapter = org.server.adapter
    assert adapter is not None
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10.0)
    try:
        if not (adapter.gro.active and udp_offload.probe_gso(peer).active):
            pytest.skip(f"no UDP GRO/GSO here: {adapter.gro.reason}")
        ep = org.endpoint
        before = Counter(ep.counters)
        to = org.address
        hellos = [hello_datagram(os.urandom(32), os.urandom(32)) for _ in range(40)]
        size = len(hellos[0])
        assert all(len(h) == size for h in hellos)
        sent_ok = 0  # datagrams the core should see
        # 1. Trains of HELLOs, each ending in a 1-byte or 37-byte garbage tail.
        for start, tail in ((0, b"\x00"), (20, os.urandom(37))):
            train = [*hellos[start : start + 20], tail]
            udp_offload.send_train(peer, train, size, to)
            sent_ok += len(train)
        # 2. Odd segment sizes of garbage, the last shorter.
        for count, seg, last in ((9, 1201, 5), (64, 17, 16), (3, 1, 1)):
            udp_offload.send_train(peer, [os.urandom(seg)] * (count - 1) + [b"z" * last], seg, to)
            sent_ok += count
        # 3. Oversize segments (and one oversize datagram without GSO): never fed.
        oversize = MAX_DATAGRAM + 1
        udp_offload.send_train(peer, [bytes(oversize)] * 5 + [b"tail"], oversize, to)
        sent_ok += 1
        peer.sendto(bytes(60_000), to)
        await taken_in(org, before["datagrams_in"] + sent_ok)

        after = Counter(ep.counters)
        delta = {k: after[k] - before[k] for k in after}
        assert delta["datagrams_in"] == sent_ok
        assert delta["retry_sent"] == len(hellos)  # every HELLO cut out whole
        assert delta.get("sessions_created", 0) == 0
        assert adapter.datagrams_oversize == 6
        retries = []
        for _ in hellos:
            reply = peer.recv(2048)
            assert unpack_header(reply).ptype is PacketType.RETRY
            retries.append(reply[HEADER_LEN:])
        assert len(retries) == len(hellos)

        # And the server still serves a genuine agent.
        batch = add_batch(org.store, 2, tag="after")
        agent = org.agent()
        await agent.start()
        await until(lambda: org.store.batch_status(batch).done == 2, 30, "jobs after the attack")
        await agent.stop()
    finally:
        peer.close()
        await org.server.stop()
