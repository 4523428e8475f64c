"""A HELLO flood from 500 source addresses that never echo their cookie.

Each flooding socket has its own address (127.0.x.y, ephemeral port) and sends
valid, padded HELLOs: most without a cookie, some with a made-up cookie, some
with a real cookie the server issued to a *different* address (what a spoofer
who sniffed one RETRY has). None of them may make the server allocate a session
or do public-key work, every answer must be one RETRY smaller than the HELLO,
and genuine agents must get through while the flood runs and after it.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vcomp.protocol.messages import Retry, decode_body
from vcomp.protocol.wire import HEADER_LEN, PacketType, unpack_header

from .harness import Org, add_batch, hello_datagram, new_tpm, start_org, udp_socket_state, until

SOURCES = 500
ROUNDS = 24  # HELLOs per source, at least
MAX_ROUNDS = 200
PACE = 250  # HELLOs sent before waiting for the server's queue to drain
GENUINE = 3
SEED = 0xF100D


@dataclass
class Flood:
    sent: int = 0
    sent_bytes: int = 0
    forged_cookies: int = 0
    stolen_cookies: int = 0
    max_sessions_seen: int = 0
    replies_taken: int = 0  # RETRYs read by the flood itself (the stolen cookie)
    done: bool = False


def _sockets() -> list[socket.socket]:
    socks = []
    for i in range(SOURCES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        socks.append(s)
    return socks


async def _flood(
    org: Org, socks: list[socket.socket], flood: Flood, busy: Callable[[], bool]
) -> None:
    """At least ROUNDS rounds, and on until ``busy()`` is false (at most MAX_ROUNDS)."""
    rng = random.Random(SEED)
    port = org.address[1]
    stolen: bytes | None = None  # a genuine cookie, issued to socks[0]...
    stolen_nonce = b""  # ...for this HELLO nonce
    round_ = -1
    while round_ + 1 < ROUNDS or busy():
        round_ += 1
        assert round_ < MAX_ROUNDS, "the genuine agents did not finish during the flood"
        for i, s in enumerate(socks):
            agent = org.tpm.agent_id if i % 3 == 0 else rng.randbytes(32)
            cookie, nonce = b"", rng.randbytes(32)
            if round_ == 0 and i == 0:
                stolen_nonce = nonce
            if round_ % 4 == 1:
                cookie = rng.randbytes(20)
                flood.forged_cookies += 1
            elif round_ % 4 == 3 and stolen is not None and i != 0:
                # A real cookie and its nonce, from the wrong address.
                cookie, nonce = stolen, stolen_nonce
                flood.stolen_cookies += 1
            datagram = hello_datagram(agent, nonce, cookie)
            s.sendto(datagram, org.address)
            flood.sent += 1
            flood.sent_bytes += len(datagram)
            if flood.sent % PACE == 0:
                await until(lambda: udp_socket_state(port).rx_queue == 0, 10, "the server")
                await asyncio.sleep(0.001)  # the genuine agents share this event loop
                flood.max_sessions_seen = max(flood.max_sessions_seen, len(org.endpoint.sessions))
        if stolen is None:
            # Sniff one real cookie (socks[0]'s first RETRY) to replay from elsewhere.
            await until(lambda: udp_socket_state(port).rx_queue == 0, 10, "the server")
            await asyncio.sleep(0.01)
            reply = socks[0].recv(2048)
            retry = decode_body(PacketType.RETRY, reply[HEADER_LEN:])
            assert isinstance(retry, Retry)
            stolen = retry.cookie
            flood.replies_taken += 1
    await until(lambda: udp_socket_state(port).rx_queue == 0, 10, "the server")
    flood.done = True


def _replies(socks: list[socket.socket]) -> list[bytes]:
    out = []
    for s in socks:
        while True:
            try:
                out.append(s.recv(2048))
            except BlockingIOError:
                break
    return out


async def test_hello_flood_allocates_nothing_and_genuine_agents_get_through(
    tmp_path: Path,
) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    ep = org.endpoint
    socks = _sockets()
    try:
        during = add_batch(org.store, 6, tag="during")
        before = Counter(ep.counters)
        sessions_before = len(ep.sessions)
        flood = Flood()
        jobs_done = False

        def busy() -> bool:
            return not jobs_done

        flood_task = asyncio.create_task(_flood(org, socks, flood, busy))
        await until(lambda: flood.sent >= 2000, 10, "the flood to get going")

        # Genuine agents, started in the middle of the flood, which goes on until
        # they have finished their jobs.
        agents = [org.agent() for _ in range(GENUINE)]
        for a in agents:
            await a.start()
        await until(lambda: all(a.connected.is_set() for a in agents), 20, "genuine agents")
        connected_at = flood.sent
        await until(lambda: org.store.batch_status(during).done == 6, 20, "jobs during flood")
        jobs_done = True
        done_at = flood.sent
        await flood_task
        assert done_at < flood.sent

        replies = _replies(socks)
        after = Counter(ep.counters)
        delta = {k: after[k] - before[k] for k in after}
        print(
            f"\nflood: {flood.sent:,} HELLOs ({flood.sent_bytes / 2**20:.1f} MiB) from "
            f"{SOURCES} addresses, {flood.forged_cookies:,} with forged and "
            f"{flood.stolen_cookies:,} with stolen cookies; {len(replies):,} replies "
            f"({sum(map(len, replies)) / 2**10:.0f} KiB, largest {max(map(len, replies))} B); "
            f"genuine agents connected after {connected_at:,} and finished 6 jobs after "
            f"{done_at:,} flood HELLOs\n"
            f"flood: counter deltas {dict(sorted(delta.items()))}"
        )
        # No state and no public-key work for the flood: only the genuine agents count.
        assert delta["sessions_created"] == GENUINE
        assert delta["public_key_ops"] == GENUINE
        assert flood.max_sessions_seen <= sessions_before + GENUINE
        assert len(ep.sessions) == sessions_before + GENUINE
        assert delta["cookie_invalid"] == flood.forged_cookies + flood.stolen_cookies
        # One RETRY per flood HELLO, each far smaller than the HELLO it answers.
        assert len(replies) + flood.replies_taken == flood.sent
        for r in replies:
            header = unpack_header(r)
            assert header.ptype is PacketType.RETRY and header.session_id == 0
            assert len(r) < 1200 // 10
        assert delta["retry_sent"] >= flood.sent

        # And after the flood, a new agent still gets through.
        later = add_batch(org.store, 1, tag="after")
        for a in agents:
            await a.stop()
        newcomer = org.agent()
        await newcomer.start()
        await until(lambda: org.store.batch_status(later).done == 1, 20, "a job after the flood")
        await newcomer.stop()
    finally:
        for s in socks:
            s.close()
        await org.server.stop()
