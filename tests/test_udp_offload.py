"""UDP GSO and GRO helpers on real loopback sockets: a train leaves as one sendmsg and
arrives as the datagrams it was made of, coalesced or not."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from vcomp import udp_offload as uo


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5.0)  # a bound: a lost datagram fails the test instead of hanging it
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


def need_gso(sock: socket.socket) -> None:
    state = uo.probe_gso(sock)
    if not state.active:
        pytest.skip(f"this kernel has no UDP GSO: {state.reason}")


def need_gro(sock: socket.socket) -> None:
    state = uo.enable_gro(sock)
    if not state.active:
        pytest.skip(f"this kernel has no UDP GRO: {state.reason}")


def train(count: int, size: int, last: int) -> list[bytes]:
    """Distinct contents per datagram, so a misplaced cut shows up as wrong bytes."""
    body = [bytes([i % 251]) * size for i in range(count - 1)]
    return [*body, bytes([250]) * last]


def receive_split(rx: socket.socket, expected: int) -> tuple[list[bytes], list[int | None]]:
    """Read until ``expected`` datagrams arrived; also the segment size of each read."""
    buffer = bytearray(uo.GRO_BUFFER)
    got: list[bytes] = []
    segments: list[int | None] = []
    while len(got) < expected:
        n, ancdata, _, _ = rx.recvmsg_into([buffer], uo.GRO_CONTROL)
        segment = uo.gro_segment_size(ancdata)
        segments.append(segment)
        got += [bytes(v) for v in uo.split_segments(memoryview(buffer)[:n], segment)]
    return got, segments


def test_a_gso_train_arrives_as_separate_datagrams_with_the_right_bytes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    need_gso(tx)
    sent = train(40, 1200, 77)
    assert uo.send_train(tx, sent, 1200, rx.getsockname()) == sum(map(len, sent))
    got = [rx.recv(2048) for _ in sent]  # no GRO on rx: the kernel cut the train
    assert got == sent


def test_gro_coalesces_a_train_and_the_split_gives_back_each_datagram(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    need_gso(tx)
    need_gro(rx)
    sent = train(20, 1000, 333)
    uo.send_train(tx, sent, 1000, rx.getsockname())
    got, segments = receive_split(rx, len(sent))
    assert got == sent
    assert segments == [1000], "loopback delivered the train as one coalesced read"


def test_a_connected_socket_sends_a_train_without_an_address(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = pair
    need_gso(tx)
    tx.connect(rx.getsockname())
    sent = train(3, 500, 500)
    uo.send_train(tx, sent, 500, None)
    assert [rx.recv(2048) for _ in sent] == sent


def test_hostile_odd_sizes_split_exactly_as_sent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A peer mixing trains with odd segment sizes and a shorter last segment, single
    datagrams of 1 byte and of a segment's size, all into a GRO socket: every read
    is cut back into exactly the datagrams the peer sent, in order."""
    tx, rx = pair
    need_gso(tx)
    need_gro(rx)
    address = rx.getsockname()
    sent: list[bytes] = []
    for count, size, last in [(7, 999, 1), (2, 1, 1), (64, 1001, 1000), (3, 1472, 13), (5, 3, 2)]:
        chunk = train(count, size, last)
        uo.send_train(tx, chunk, size, address)
        sent += chunk
        for single in (b"\x01", bytes(size)):
            tx.sendto(single, address)
            sent.append(single)
    got, _ = receive_split(rx, len(sent))
    assert got == sent


def test_a_train_the_kernel_refuses_raises_and_sends_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """More than the kernel's segment limit in one train: refused as a whole (the
    adapter never builds one; this is what it would fall back from)."""
    tx, rx = pair
    need_gso(tx)
    rx.setblocking(False)
    with pytest.raises(OSError):
        uo.send_train(tx, [b"x" * 10] * 200, 10, rx.getsockname())
    with pytest.raises(BlockingIOError):
        rx.recv(2048)


def test_gro_segment_size_ignores_malformed_control_data() -> None:
    level, kind = uo.SOL_UDP, uo.UDP_GRO
    assert uo.gro_segment_size([(level, kind, struct.pack("=i", 1200))]) == 1200
    assert uo.gro_segment_size([(level, kind, struct.pack("=H", 1200))]) == 1200
    assert uo.gro_segment_size([]) is None
    assert uo.gro_segment_size([(level, kind, b"\x05")]) is None
    assert uo.gro_segment_size([(level, kind, struct.pack("=i", 0))]) is None
    assert uo.gro_segment_size([(level, kind, struct.pack("=i", -8))]) is None
    assert uo.gro_segment_size([(socket.SOL_SOCKET, kind, struct.pack("=i", 9))]) is None


def test_split_segments_bounds() -> None:
    data = memoryview(bytes(range(10)))
    assert [bytes(v) for v in uo.split_segments(data, None)] == [bytes(range(10))]
    assert [bytes(v) for v in uo.split_segments(data, 0)] == [bytes(range(10))]
    assert [bytes(v) for v in uo.split_segments(data, 10)] == [bytes(range(10))]
    assert [bytes(v) for v in uo.split_segments(data, 50)] == [bytes(range(10))]
    assert [bytes(v) for v in uo.split_segments(data, 4)] == [
        bytes([0, 1, 2, 3]),
        bytes([4, 5, 6, 7]),
        bytes([8, 9]),
    ]
    assert list(uo.split_segments(memoryview(b""), 4)) == [memoryview(b"")]


def test_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uo.offload_wanted({})
    assert uo.offload_wanted({uo.OFFLOAD_ENV: "on"})
    for value in ("off", "OFF", " 0 ", "no", "false"):
        assert not uo.offload_wanted({uo.OFFLOAD_ENV: value})
    monkeypatch.setenv(uo.OFFLOAD_ENV, "off")
    gso, gro = uo.probe_loopback()
    assert (gso.status, gro.status) == ("off", "off")


def test_probe_loopback_says_what_this_machine_does() -> None:
    gso, gro = uo.probe_loopback()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert gso.active == uo.probe_gso(s).active
        assert gro.active == uo.enable_gro(s).active
    assert gso.reason and gro.reason
