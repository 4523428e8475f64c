"""Fuzz a running ``vcomp-server serve`` with over 200,000 hostile datagrams.

The server runs as a child process so its resident memory can be read from
/proc before and after. The corpus is a real session captured through a proxy
(HELLOs, ATTEST, READY, RESULT, ACK one way; RETRY, CHALLENGE, KEY, START,
CODE, END, ACK the other). Then the server must still be alive, must not have
grown by more than 64 MiB, must not have dropped the live session the fuzzer
was forging packets for, and must run a job for a fresh agent.

Sending is paced by the server socket's receive queue (read from
/proc/net/udp), so the datagrams are processed rather than dropped by the
kernel; kernel drops are counted and not credited.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from vcomp.loadgen import LiteAgent
from vcomp.protocol import handshake as hs
from vcomp.protocol.messages import Attest, Retry, decode_body, encode_body
from vcomp.protocol.wire import HEADER_LEN, PacketType, unpack_header
from vcomp.server.store.sqlite import SqliteStore

from .capture import CaptureProxy
from .fuzzgen import DatagramFuzzer, packet
from .harness import (
    ServerProcess,
    add_batch,
    forgeries,
    hello_datagram,
    make_server_home,
    new_tpm,
    prepare_store,
    start_org,
    udp_socket_state,
    until,
)

SEED = 0x5EED_F022
TARGET = 200_000  # datagrams the server's socket must have accepted
ATTEST_SESSIONS = 300  # full cookie handshakes that end in a forged ATTEST
BATCH = 64
RX_QUEUE_LIMIT = 32 * 1024  # bytes queued at the server before the fuzzer waits
TIME_LIMIT = 90.0  # the loop is bounded in time as well as in count
MAX_RSS_GROWTH = 64 << 20
AGENT_DATAGRAMS = 20_000
MiB = 1 << 20


@dataclass
class FuzzReport:
    sent: int = 0
    kernel_drops: int = 0
    replies: int = 0
    reply_bytes: int = 0
    sent_bytes: int = 0
    seconds: float = 0.0
    categories: Counter[str] = field(default_factory=Counter)
    attest_sent: int = 0
    attest_rejected: int = 0

    @property
    def delivered(self) -> int:
        return self.sent - self.kernel_drops


def _drain(sock: socket.socket, report: FuzzReport) -> None:
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        report.replies += 1
        report.reply_bytes += len(data)


async def _blast(
    sock: socket.socket, server: tuple[str, int], fuzzer: DatagramFuzzer, report: FuzzReport
) -> None:
    port = server[1]
    drops_before = udp_socket_state(port).drops
    started = time.monotonic()
    while report.sent - report.kernel_drops < TARGET:
        assert time.monotonic() - started < TIME_LIMIT, f"fuzz loop too slow: {report}"
        for _ in range(BATCH):
            name, data = fuzzer.next()
            try:
                sock.sendto(data, server)
            except BlockingIOError:
                continue
            report.sent += 1
            report.sent_bytes += len(data)
            report.categories[name] += 1
        _drain(sock, report)
        # Let the server keep up (and let this loop's agent answer its PINGs).
        while udp_socket_state(port).rx_queue > RX_QUEUE_LIMIT:
            await asyncio.sleep(0.0005)
        await asyncio.sleep(0)
        report.kernel_drops = udp_socket_state(port).drops - drops_before


async def _reply_of_type(sock: socket.socket, ptype: PacketType, report: FuzzReport) -> bytes:
    loop = asyncio.get_running_loop()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
        report.replies += 1
        report.reply_bytes += len(data)
        if len(data) >= HEADER_LEN and data[3] == ptype:
            return data


async def _forged_attests(
    sock: socket.socket,
    server: tuple[str, int],
    agent_id: bytes,
    real_attest: bytes,
    report: FuzzReport,
    rng: random.Random,
    fuzzer: DatagramFuzzer,
) -> None:
    """Complete the cookie exchange, then answer CHALLENGE with a forged ATTEST.

    This reaches the code that only a validated address reaches: the ATTEST
    decoder and the quote verifier. Every forgery must end in a REJECT.
    """
    real = decode_body(PacketType.ATTEST, real_attest[HEADER_LEN:])
    assert isinstance(real, Attest)
    _drain(sock, report)
    for i in range(ATTEST_SESSIONS):
        nonce = rng.randbytes(32)
        sock.sendto(hello_datagram(agent_id, nonce), server)
        retry = await _reply_of_type(sock, PacketType.RETRY, report)
        retry_body = decode_body(PacketType.RETRY, retry[HEADER_LEN:])
        assert isinstance(retry_body, Retry)
        cookie = retry_body.cookie
        sock.sendto(hello_datagram(agent_id, nonce, cookie, pn=1), server)
        challenge = await _reply_of_type(sock, PacketType.CHALLENGE, report)
        session_id = unpack_header(challenge).session_id
        kind = i % 5
        if kind == 0:
            body = real_attest[HEADER_LEN:]  # a replay: bound to another nonce
        elif kind == 1:
            flipped = bytearray(real_attest[HEADER_LEN:])
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            body = bytes(flipped)
        elif kind == 2:
            quote = bytearray(real.quote)
            quote[rng.randrange(len(quote))] ^= 1 << rng.randrange(8)
            body = encode_body(replace(real, quote=bytes(quote[: rng.randint(1, len(quote))])))
        elif kind == 3:
            body = encode_body(
                replace(
                    real,
                    ephemeral=rng.randbytes(rng.randint(1, 300)),
                    signature=rng.randbytes(rng.randint(1, 256)),
                    pcr_values=tuple(rng.randbytes(32) for _ in range(rng.randint(1, 8))),
                )
            )
        else:
            body = fuzzer.garbage_body()[:1448]
        sock.sendto(packet(PacketType.ATTEST, 0, session_id, 2, body), server)
        report.attest_sent += 3
        await _reply_of_type(sock, PacketType.REJECT, report)
        report.attest_rejected += 1


async def test_fuzzed_server_survives_and_still_serves(tmp_path: Path) -> None:
    tpm = new_tpm(tmp_path / "tpm")
    home = tmp_path / "srv"
    make_server_home(home)
    store = SqliteStore(home / "jobs.sqlite")
    prepare_store(store, tpm)
    add_batch(store, 2, tag="capture")
    store.close()
    server = ServerProcess(home, tmp_path / "server.log")
    proxy = CaptureProxy(server.address)
    ephemeral = hs.generate_ephemeral()
    try:
        # 1. A real session through the proxy: the corpus, and a live session id.
        await proxy.start()
        live = LiteAgent(
            tpm=tpm, pinned=server.fingerprint, server=proxy.address, ephemeral=ephemeral
        )
        await live.start()
        await until(lambda: live.stats.committed >= 2, 30, "the capture session's two jobs")
        assert live.session is not None
        live_sid = live.session.session_id
        corpus = proxy.to_server_log + proxy.to_agent_log
        attests = [d for d in proxy.to_server_log if d[3] == PacketType.ATTEST]
        kinds = {PacketType(d[3]).name for d in corpus}
        assert {"HELLO", "ATTEST", "RESULT", "CHALLENGE", "KEY", "START", "CODE"} <= kinds

        # 2. The fuzz.
        rss_before = server.rss_bytes()
        report = FuzzReport()
        fuzzer = DatagramFuzzer(SEED, corpus, live_sid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        started = time.monotonic()
        try:
            await _blast(sock, server.address, fuzzer, report)
            await _forged_attests(
                sock,
                server.address,
                tpm.agent_id,
                attests[0],
                report,
                random.Random(SEED),
                fuzzer,
            )
            await until(lambda: udp_socket_state(server.address[1]).rx_queue == 0, 30, "the server")
            _drain(sock, report)
        finally:
            sock.close()
        report.seconds = time.monotonic() - started
        assert server.alive(), "the server died under fuzzing"
        rss_after = server.rss_bytes()
        print(
            f"\nfuzz: sent {report.sent:,} datagrams + {report.attest_sent} in forged "
            f"handshakes, kernel drops {report.kernel_drops}, accepted by the server's "
            f"socket {report.delivered + report.attest_sent:,} in {report.seconds:.1f} s "
            f"= {(report.delivered + report.attest_sent) / report.seconds:,.0f} datagrams/s"
            f"\nfuzz: {report.sent_bytes / MiB:.1f} MiB sent, {report.replies:,} replies "
            f"({report.reply_bytes / MiB:.2f} MiB); forged ATTESTs rejected "
            f"{report.attest_rejected}/{ATTEST_SESSIONS}"
            f"\nfuzz: server RSS before {rss_before / MiB:.1f} MiB, after "
            f"{rss_after / MiB:.1f} MiB (growth {(rss_after - rss_before) / MiB:+.1f} MiB)"
            f"\nfuzz: categories {dict(sorted(report.categories.items()))}"
        )
        assert report.delivered >= TARGET
        assert report.attest_rejected == ATTEST_SESSIONS
        assert rss_after - rss_before < MAX_RSS_GROWTH
        # Replies are rare and always smaller than what provoked them.
        assert report.reply_bytes < report.sent_bytes // 10

        # 3. The live session whose id the fuzzer forged packets for is untouched.
        assert live.ready and not live.stats.closed, live.stats.closed
        await live.stop()

        # 4. A fresh agent still gets a job done.
        store = SqliteStore(home / "jobs.sqlite")
        try:
            batch = add_batch(store, 1, tag="after-fuzz")
            fresh = LiteAgent(
                tpm=tpm, pinned=server.fingerprint, server=server.address, ephemeral=ephemeral
            )
            await fresh.start()
            await until(lambda: fresh.stats.committed >= 1, 30, "a job after the fuzz")
            await fresh.stop()
            await until(lambda: store.batch_status(batch).done == 1, 10, "the job in the store")
        finally:
            store.close()
        assert server.alive()
    finally:
        proxy.close()
        code = server.stop()
        log = (tmp_path / "server.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-4000:]
        assert "internal_error" not in log, log[-4000:]
    assert code == 0, f"vcomp-server exited with {code}"


async def test_fuzzed_agent_keeps_its_session(tmp_path: Path) -> None:
    """The other direction: hostile datagrams at an agent, from the server's address."""
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy = CaptureProxy(org.address)
    await proxy.start()
    agent = org.agent(proxy.address)
    try:
        await agent.start()
        add_batch(org.store, 1, tag="before")
        await until(lambda: agent.stats.committed == 1, 20, "a job before the fuzz")
        assert agent.session is not None
        fuzzer = DatagramFuzzer(SEED + 1, proxy.to_server_log + proxy.to_agent_log, 0)
        fuzzer.live_session = agent.session.session_id
        for i in range(AGENT_DATAGRAMS):
            proxy.to_agent(fuzzer.next()[1])
            if i % 256 == 0:
                await asyncio.sleep(0.001)  # let the agent read
        add_batch(org.store, 1, tag="after")
        await until(lambda: agent.stats.committed == 2, 20, "a job after the fuzz")
        assert agent.ready and not agent.stats.closed and agent.stats.rejected == []
        forged = forgeries(agent.session.channel)
        print(
            f"\nagent fuzz: {AGENT_DATAGRAMS:,} datagrams, {forged:,} failed the AEAD; "
            "session intact, next job done"
        )
        assert forged > AGENT_DATAGRAMS // 20
    finally:
        await agent.stop()
        proxy.close()
        await org.server.stop()
