"""The asyncio adapter on real UDP sockets: what the kernel reports reaches the core."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from vcomp import udp_offload
from vcomp.agent.measure import measured_launch
from vcomp.agent.preferences.rate import TokenBucket
from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol import events as ev
from vcomp.protocol.agent_session import AgentSession
from vcomp.protocol.limits import HANDSHAKE_GIVE_UP
from vcomp.transport import MAX_DATAGRAM, open_agent, open_server

SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)  # Linux; not exported by Python 3.11


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_closed_server_port_ends_the_handshake_at_once(tmp_path: Path) -> None:
    """No server on the port: the kernel answers HELLO with ICMP port unreachable, and
    the handshake ends on that, not after HANDSHAKE_GIVE_UP of retries (the agent then
    tries its next server)."""
    tpm = SimulatedTpm.open(tmp_path / "tpm")
    measured_launch(tpm, {})
    loop = asyncio.get_running_loop()
    events: list[ev.Event] = []
    session = AgentSession(
        agent_id=tpm.agent_id,
        pinned_server=bytes(32),
        quote=lambda extra, pcrs: tpm.quote(extra, pcrs),
        now=loop.time(),
    )
    adapter = await open_agent(session, events.append, "127.0.0.1", closed_udp_port())
    try:
        session.connect(loop.time())
        adapter.kick()
        deadline = loop.time() + HANDSHAKE_GIVE_UP + 15  # a bound, not the oracle
        while not any(isinstance(e, ev.SessionClosed) for e in events):
            assert loop.time() < deadline, f"still waiting: {events}"
            await asyncio.sleep(0.05)
    finally:
        adapter.close()
    closed = next(e for e in events if isinstance(e, ev.SessionClosed))
    assert closed.reason == "handshake failed: the server's port is closed"
    assert any(isinstance(e, ev.Rejected) and "port is closed" in e.reason for e in events)


# ---- batched datagram I/O (UDP GSO / GRO) ------------------------------------------


class RecordingCore:
    """The smallest ServerCore: records what it is fed, sends what a test queues."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.outgoing: list[tuple[bytes, tuple[str, int]]] = []

    def receive_datagram(self, data: bytes, address: tuple[str, int], now: float) -> None:
        self.received.append((data, address))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self.outgoing = self.outgoing, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> ev.Event | None:
        return None


def _train(count: int, size: int, last: int, tag: int = 0) -> list[bytes]:
    return [bytes([(tag + i) % 251]) * size for i in range(count - 1)] + [bytes([tag]) * last]


def _gro_socket() -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Room for every datagram a test sends before it reads (the kernel may cap this).
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5.0)
    return rx


def _read_all(rx: socket.socket, expected: int) -> tuple[list[bytes], int]:
    """The datagrams as sent, and how many reads they took (fewer: the kernel coalesced)."""
    buffer = bytearray(udp_offload.GRO_BUFFER)
    got: list[bytes] = []
    reads = 0
    while len(got) < expected:
        n, ancdata, _, _ = rx.recvmsg_into([buffer], udp_offload.GRO_CONTROL)
        reads += 1
        segment = udp_offload.gro_segment_size(ancdata)
        got += [bytes(v) for v in udp_offload.split_segments(memoryview(buffer)[:n], segment)]
    return got, reads


async def test_the_adapter_sends_a_train_per_peer_with_gso() -> None:
    """Interleaved trains for two peers leave as one train each (the GRO receivers get
    them in a read or two), every datagram arrives once, in order, with its bytes."""
    core = RecordingCore()
    adapter = await open_server(core, lambda e: None, "127.0.0.1", 0)
    a, b = _gro_socket(), _gro_socket()
    try:
        if not adapter.gso.active or not udp_offload.enable_gro(a).active:
            pytest.skip(f"no UDP GSO/GRO here: {adapter.gso.reason}")
        udp_offload.enable_gro(b)
        to_a = _train(50, 1200, 300, tag=1) + _train(30, 1200, 1200, tag=7)
        to_b = _train(20, 900, 17, tag=3)
        addr_a, addr_b = a.getsockname(), b.getsockname()
        core.outgoing = [(d, addr_a) for d in to_a[:10]] + [(d, addr_b) for d in to_b]
        core.outgoing += [(d, addr_a) for d in to_a[10:]]
        adapter.flush()
        got_a, reads_a = _read_all(a, len(to_a))
        got_b, reads_b = _read_all(b, len(to_b))
        assert got_a == to_a and got_b == to_b
        # a: 10, then 40 + the 300-byte end, then 30: three trains; b: one.
        assert (reads_a, reads_b) == (3, 1)
        assert adapter.datagrams_sent == len(to_a) + len(to_b)
        assert adapter.bytes_sent == sum(map(len, to_a + to_b))
        assert adapter.gso.active
    finally:
        adapter.close()
        a.close()
        b.close()


async def test_with_offload_off_each_datagram_goes_singly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(udp_offload.OFFLOAD_ENV, "off")
    core = RecordingCore()
    adapter = await open_server(core, lambda e: None, "127.0.0.1", 0)
    rx = _gro_socket()
    try:
        assert (adapter.gso.status, adapter.gro.status) == ("off", "off")
        assert adapter.offload_summary == "gso=off gro=off"
        sent = _train(30, 1200, 100)
        udp_offload.enable_gro(rx)
        core.outgoing = [(d, rx.getsockname()) for d in sent]
        adapter.flush()
        got, reads = _read_all(rx, len(sent))
        assert got == sent
        assert reads == len(sent)  # nothing coalesced: no train was sent
        # And it still reads: a GSO train sent to it arrives as separate datagrams.
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            incoming = _train(5, 700, 70)
            udp_offload.send_train(peer, incoming, 700, adapter.local_address)
            await _until(lambda: len(core.received) == len(incoming))
            assert [d for d, _ in core.received] == incoming
        finally:
            peer.close()
    finally:
        adapter.close()
        rx.close()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 10  # a bound, not the oracle
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)


async def test_the_adapter_splits_coalesced_reads_and_drops_oversize_segments() -> None:
    """A peer's trains (odd sizes, a shorter last segment) reach the core as the
    datagrams sent; a train of segments longer than any datagram the core accepts
    is dropped and counted, and the datagrams after it still arrive."""
    core = RecordingCore()
    adapter = await open_server(core, lambda e: None, "127.0.0.1", 0)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        if not adapter.gro.active or not udp_offload.probe_gso(peer).active:
            pytest.skip(f"no UDP GSO/GRO here: {adapter.gro.reason}")
        to = adapter.local_address
        expected: list[bytes] = []
        for count, size, last in [(9, 1201, 5), (2, 1, 1), (64, 1000, 999)]:
            chunk = _train(count, size, last, tag=count)
            udp_offload.send_train(peer, chunk, size, to)
            expected += chunk
        oversize = _train(6, MAX_DATAGRAM + 1000, 10)
        udp_offload.send_train(peer, oversize, MAX_DATAGRAM + 1000, to)
        expected.append(oversize[-1])  # the short tail is a datagram like any other
        peer.sendto(b"after", to)
        peer.sendto(bytes(60000), to)  # one oversize datagram, no GSO
        peer.sendto(b"last", to)
        expected += [b"after", b"last"]
        await _until(lambda: len(core.received) == len(expected))
        assert [d for d, _ in core.received] == expected
        assert {a for _, a in core.received} == {peer.getsockname()}
        assert adapter.datagrams_oversize == 6
        assert adapter.datagrams_received == len(expected)
    finally:
        adapter.close()
        peer.close()


class RecordingAgentCore:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.outgoing: list[bytes] = []

    def receive_datagram(self, data: bytes, now: float) -> None:
        self.received.append(data)

    def port_unreachable(self, now: float) -> None:
        pass

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self.outgoing = self.outgoing, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> ev.Event | None:
        return None


async def test_rate_capped_agent_trains_stay_within_the_cap_and_lose_nothing() -> None:
    """An upload cap cuts trains where the bucket says wait (each datagram charged
    once); a download cap turns GRO off, since one coalesced read could be 64 KB."""
    loop = asyncio.get_running_loop()
    rx = _gro_socket()
    upload, download = TokenBucket(200_000, loop.time()), TokenBucket(200_000, loop.time())
    core = RecordingAgentCore()
    adapter = await open_agent(
        core, lambda e: None, *rx.getsockname(), upload=upload, download=download
    )
    try:
        assert adapter.gro.status == "off" and "max_download_rate" in adapter.gro.reason
        sent = _train(200, 1200, 1200)  # 240 kB: past the 200 kB burst, so it waits
        core.outgoing = list(sent)
        started = loop.time()
        adapter.flush()
        got, _ = await asyncio.to_thread(_read_all, rx, len(sent))
        elapsed = loop.time() - started
        assert got == sent
        assert upload.taken == sum(map(len, sent))  # charged once each, none twice
        assert upload.taken <= upload.burst + 200_000 * elapsed + 2048
    finally:
        adapter.close()
        rx.close()


async def test_a_train_the_kernel_refuses_falls_back_to_single_sends_and_is_remembered() -> None:
    """GSO known to the kernel but refused on first use (here: SO_NO_CHECK, which the
    kernel will not segment, EINVAL): the train goes datagram by datagram, nothing is
    lost, and the adapter stops trying trains."""
    core = RecordingCore()
    adapter = await open_server(core, lambda e: None, "127.0.0.1", 0)
    rx = _gro_socket()
    try:
        if not adapter.gso.active:
            pytest.skip(f"no UDP GSO here: {adapter.gso.reason}")
        adapter.sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        first, second = _train(10, 1200, 50, tag=1), _train(10, 1200, 50, tag=2)
        core.outgoing = [(d, rx.getsockname()) for d in first]
        adapter.flush()
        assert adapter.gso.status == "unavailable"
        assert "UDP_SEGMENT" in adapter.gso.reason
        core.outgoing = [(d, rx.getsockname()) for d in second]
        adapter.flush()
        got, _ = _read_all(rx, len(first) + len(second))
        assert got == first + second
        assert adapter.trains_sent == 0
        assert adapter.datagrams_sent == len(first) + len(second)
    finally:
        adapter.close()
        rx.close()
