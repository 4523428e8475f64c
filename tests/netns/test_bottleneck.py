"""The bottleneck path itself (delay line, queue, loss), and a pi batch across it.

The figures checked are bounds the path guarantees whatever the machine's load:
a round trip never beats the delay line, a transfer never beats the rate limit,
and the seeded loss drops exactly what the delay line reports. The goodput and
fairness figures of vcomp flows across this path are benchmarks
(``bench/bench_impaired.py``); the fairness tests judge byte shares
(``test_competing_flows.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns.bottleneck import Bottleneck, host_address, tc_queue_counts
from tests.netns.cluster import Cluster
from tests.netns.test_pi_batch import run_pi_batch

pytestmark = pytest.mark.netns

PORT = 5099
ECHO = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], {PORT}))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    if data == b"stop":
        break
    s.sendto(data, peer)
"""
PROBE = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
rtts = []
for i in range(int(sys.argv[2])):
    sent = time.monotonic()
    s.sendto(str(i).encode(), (sys.argv[1], {PORT}))
    try:
        while s.recv(2048) != str(i).encode():
            pass
    except TimeoutError:
        continue
    rtts.append(time.monotonic() - sent)
s.sendto(b"stop", (sys.argv[1], {PORT}))
print(" ".join(f"{{r:.6f}}" for r in rtts))
"""
SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(3.0)
print("ready", flush=True)
n = 0
try:
    while s.recv(2048) != b"end":
        n += 1
except TimeoutError:
    pass
print(n)
"""
TCP_SINK = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
c, _ = s.accept()
n = 0
while data := c.recv(1 << 16):
    n += len(data)
print(n)
"""
TCP_SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(bytes(int(sys.argv[3])))
c.close()
"""
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x" * 100, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.001)
"""
HOSTS_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5102))
s.settimeout(3.0)
print("ready", flush=True)
seen = set()
try:
    while True:
        data, peer = s.recvfrom(100)
        seen.add(peer[0])
        s.sendto(data, peer)
except TimeoutError:
    pass
print(" ".join(sorted(seen)))
"""
HOSTS_CLIENTS = """
import socket, sys
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(int(sys.argv[2]))]
for s in socks:
    s.connect((sys.argv[1], 5102))
    s.settimeout(3.0)
    s.send(b"x")
replies = 0
for s in socks:
    try:
        replies += s.recv(10) == b"x"
    except TimeoutError:
        pass
print(replies)
"""
SIZES_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5103))
s.settimeout(2.0)
print("ready", flush=True)
sizes = []
try:
    while True:
        sizes.append(len(s.recv(65535)))
except TimeoutError:
    pass
print(" ".join(map(str, sizes)))
"""
OVERSIZE_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 5103))
s.send(bytes(3000))  # one datagram over the MTU: the sender's IP fragments it
s.setsockopt(socket.SOL_UDP, 103, 1200)  # UDP_SEGMENT: one 12000-byte send, ten datagrams
s.send(bytes(12000))
"""
UDP_END = """
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"end", (sys.argv[1], int(sys.argv[2])))
"""


def start(path: Bottleneck, side: str, source: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        path.argv(side, [sys.executable, "-c", source, *args]), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_round_trip_never_beats_the_delay_line(
    make_bottleneck: Callable[..., Bottleneck],
) -> None:
    path = make_bottleneck(rtt_ms=40.0)
    echo = start(path, "a", ECHO, path.addr["a"])
    out = path.run("b", [sys.executable, "-c", PROBE, path.addr["a"], "20"])
    echo.wait(timeout=10)
    rtts = [float(word) for word in out.split()]
    print(f"\n20 probes through a 40 ms path: min {min(rtts) * 1000:.1f} ms, "
          f"max {max(rtts) * 1000:.1f} ms")  # fmt: skip
    assert len(rtts) == 20, out
    assert min(rtts) >= 0.040, rtts
    path.close()
    assert path.delayline_counts()["passed"] >= 40, path.delayline_report


def test_a_transfer_never_beats_the_rate_limit(
    make_bottleneck: Callable[..., Bottleneck],
) -> None:
    path = make_bottleneck(rate="20mbit", rtt_ms=10.0)
    size = 4 << 20
    receiver = start(path, "a", TCP_SINK, path.addr["a"], "5100")
    started = time.monotonic()
    path.run("b", [sys.executable, "-c", TCP_SEND, path.addr["a"], "5100", str(size)])
    received = int(receiver.communicate(timeout=60)[0])
    elapsed = time.monotonic() - started
    rate = received * 8 / elapsed / 1e6
    print(f"\n{received:,} bytes over TCP through 20 Mbit/s: {rate:.1f} Mbit/s")
    assert received == size
    # The tbf's 4500-byte burst is the only credit beyond the rate.
    assert received - 4500 <= 20e6 / 8 * elapsed


def test_seeded_loss_drops_what_the_delay_line_reports(
    make_bottleneck: Callable[..., Bottleneck],
) -> None:
    path = make_bottleneck(rtt_ms=2.0, loss=0.2, seed=5)
    sink = start(path, "a", SINK, path.addr["a"], "5101")
    path.run("b", [sys.executable, "-c", UDP_SEND, path.addr["a"], "5101", "500"])
    # "end" may itself be lost: the sink then stops on its 3 s timeout.
    path.run("b", [sys.executable, "-c", UDP_END, path.addr["a"], "5101"])
    received = int(sink.communicate(timeout=30)[0])
    path.close()
    counts = path.delayline_counts()
    print(f"\n500 datagrams at 20% loss: {received} arrived, delay line {counts}")
    assert received + counts["dropped"] in (500, 501)  # 501 when "end" itself was lost
    assert 300 <= received <= 450  # 20% of 500 = 100 +- about 5 sigma


def test_many_hosts_gives_each_flow_its_own_source_address(
    make_bottleneck: Callable[..., Bottleneck],
) -> None:
    path = make_bottleneck(rtt_ms=2.0)
    if shutil.which("nft") is None:
        pytest.skip("nft not installed (package nftables)")
    path.many_hosts(50)
    server = start(path, "a", HOSTS_SERVER, path.addr["a"])
    # 60 sockets: the 51st flow wraps round to the first address.
    replies = int(path.run("b", [sys.executable, "-c", HOSTS_CLIENTS, path.addr["a"], "60"]))
    seen = server.communicate(timeout=30)[0].split()
    assert replies == 60  # every reply found its socket back through the NAT
    assert sorted(seen) == sorted(host_address(i) for i in range(50))


def test_no_packet_crosses_the_delay_line_bigger_than_the_mtu(
    make_bottleneck: Callable[..., Bottleneck],
) -> None:
    """A datagram over the MTU crosses as IP fragments, a UDP GSO send as its segments:
    each is delayed (and could be lost or queued) on its own, as on a real link."""
    path = make_bottleneck(rate=None, rtt_ms=4.0)
    sink = start(path, "a", SIZES_SINK, path.addr["a"])
    path.run("b", [sys.executable, "-c", OVERSIZE_SEND, path.addr["a"]])
    sizes = [int(word) for word in sink.communicate(timeout=30)[0].split()]
    path.close()
    assert sizes == [3000] + [1200] * 10
    assert path.delayline_counts()["largest"] <= 1500, path.delayline_report


def test_queue_counts_read_tc_statistics() -> None:
    text = (
        "qdisc tbf 80f7: root refcnt 3 rate 20Mbit burst 4500b lat 38.2ms \n"
        " Sent 8771710 bytes 5803 pkt (dropped 151, overlimits 17178 requeues 0) \n"
        " backlog 0b 0p requeues 0\n"
    )
    assert tc_queue_counts(text) == {"bytes": 8771710, "packets": 5803, "dropped": 151}
    assert tc_queue_counts("") == {"bytes": 0, "packets": 0, "dropped": 0}


def test_pi_batch_across_a_lossy_bottleneck(
    make_bottleneck: Callable[..., Bottleneck], tmp_path: Path
) -> None:
    """20 Mbit/s, 40 ms RTT with 10 ms jitter, 1% loss each way: every job exact, once."""
    path = make_bottleneck(rate="20mbit", rtt_ms=40.0, jitter_ms=10.0, loss=0.01)
    cluster = Cluster(path, tmp_path / "cluster", agents=2)
    cluster.root.mkdir()
    cluster.setup()
    try:
        run_pi_batch(cluster)
    finally:
        cluster.stop()
    path.close()
    print(f"delay line: {path.delayline_counts()}")
    assert path.delayline_counts()["dropped"] > 0, path.delayline_report
