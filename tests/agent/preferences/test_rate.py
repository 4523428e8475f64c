"""The rate caps: the token bucket with an explicit clock, and the agent adapter on real
UDP sockets, judged by bytes (what got through by a given loop time), never by duration."""

from __future__ import annotations

import asyncio
import socket

from vcomp.agent.preferences.rate import MIN_BURST, TokenBucket
from vcomp.transport import AgentAdapter


def test_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(100_000, now=0.0)
    sent = 0
    now = 0.0
    while now < 10.0:
        wait = b.delay(now)
        if wait > 0:
            now += wait
            continue
        b.take(1200, now)
        sent += 1200
    # At most one burst plus ten seconds at the rate (plus one datagram of debt).
    assert sent <= b.burst + 10 * 100_000 + 1200
    assert sent >= 10 * 100_000 * 0.95
    assert TokenBucket(10, now=0.0).burst == MIN_BURST


class _Core:
    """A minimal agent core that always has datagrams to send (pure, no I/O)."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.received = 0

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.received += len(data)

    def port_unreachable(self, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = [b"x" * 1000 for _ in range(min(self.left, 64))]
        self.left -= len(out)
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> None:
        return None


def _pair() -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _drain(sock: socket.socket) -> int:
    total = 0
    while True:
        try:
            total += len(sock.recv(4096))
        except BlockingIOError:
            return total


async def test_upload_cap_paces_the_send_path() -> None:
    loop = asyncio.get_running_loop()
    rate = 50_000
    a, b = _pair()
    core = _Core(count=1000)  # 1 MB queued at once
    start = loop.time()
    bucket = TokenBucket(rate, start)
    adapter = AgentAdapter(core, a, lambda e: None, upload=bucket)
    try:
        adapter.kick()
        arrived = 0
        while loop.time() - start < 1.5:
            await asyncio.sleep(0.05)
            arrived += _drain(b)
            elapsed = loop.time() - start
            assert arrived <= bucket.burst + rate * elapsed + 1000 * 2, (arrived, elapsed)
        assert arrived >= bucket.burst + rate * 0.5  # it does send, at about the rate
    finally:
        adapter.close()
        b.close()


async def test_download_cap_paces_reading() -> None:
    loop = asyncio.get_running_loop()
    rate = 50_000
    a, b = _pair()
    core = _Core(count=0)
    start = loop.time()
    bucket = TokenBucket(rate, start)
    adapter = AgentAdapter(core, a, lambda e: None, download=bucket)
    try:
        for _ in range(500):  # 500 kB arrive at once
            b.send(b"y" * 1000)
        while loop.time() - start < 1.5:
            await asyncio.sleep(0.05)
            elapsed = loop.time() - start
            assert core.received <= bucket.burst + rate * elapsed + 1000 * 2, (
                core.received,
                elapsed,
            )
        assert core.received >= bucket.burst + rate * 0.5
    finally:
        adapter.close()
        b.close()
