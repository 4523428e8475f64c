"""A user-space delay line: the RTT of the bottleneck path, since this kernel has no netem.

    python tests/netns/delayline.py --dev NAME --delay-ms D [--jitter-ms J] [--loss P] [--seed S]

Run inside the middle namespace of :class:`tests.netns.bottleneck.Bottleneck`. It
creates the TUN device NAME, prints ``ready`` once it exists, and then holds every
IP packet the kernel routes into the device for D ms (plus a uniform draw from
[0, J) ms when J > 0, which may reorder, as netem's jitter does), drops a fraction P
of them at random, and writes the rest back into the device, where the kernel
forwards them on. Both directions pass through it, so the path's RTT is 2 * D.

SIGTERM or SIGINT prints ``passed=N dropped=M largest=L`` (L: the largest packet
admitted, in bytes: above the MTU means offloads merged segments upstream) and exits
0. Stdlib only.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time
from collections import deque
from types import FrameType

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65535
# A packet is released at most this late; sleeping finer than this costs CPU for nothing.
TICK = 0.0005


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    ifreq = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifreq)
    return fd


class DelayLine:
    """Packets waiting for their release time; FIFO without jitter, a heap with it."""

    def __init__(self, delay: float, jitter: float, loss: float, rng: random.Random) -> None:
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.rng = rng
        self.fifo: deque[tuple[float, bytes]] = deque()
        self.heap: list[tuple[float, int, bytes]] = []
        self.sequence = 0
        self.passed = 0
        self.dropped = 0
        self.largest = 0

    def admit(self, packet: bytes, now: float) -> None:
        if len(packet) > self.largest:
            self.largest = len(packet)
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.jitter:
            self.sequence += 1
            due = now + self.delay + self.rng.random() * self.jitter
            heapq.heappush(self.heap, (due, self.sequence, packet))
        else:
            self.fifo.append((now + self.delay, packet))

    def next_due(self) -> float | None:
        if self.heap:
            return self.heap[0][0]
        return self.fifo[0][0] if self.fifo else None

    def release(self, now: float) -> list[bytes]:
        out = []
        while self.fifo and self.fifo[0][0] <= now:
            out.append(self.fifo.popleft()[1])
        while self.heap and self.heap[0][0] <= now:
            out.append(heapq.heappop(self.heap)[2])
        self.passed += len(out)
        return out


def serve(fd: int, line: DelayLine, stop: list[bool]) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not stop[0]:
        now = time.monotonic()
        due = line.next_due()
        wait_ms = 200 if due is None else max(0, int((due - now + TICK) * 1000))
        if poller.poll(wait_ms):
            now = time.monotonic()
            while True:
                try:
                    line.admit(os.read(fd, MAX_PACKET), now)
                except BlockingIOError:
                    break
        for packet in line.release(time.monotonic()):
            try:
                os.write(fd, packet)
            except OSError:
                line.dropped += 1  # the kernel refused it (device going down): a loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0.0 <= args.loss < 1.0 or args.delay_ms < 0 or args.jitter_ms < 0:
        parser.error("need 0 <= loss < 1 and non-negative delay and jitter")
    fd = open_tun(args.dev)
    stop = [False]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)
    line = DelayLine(
        args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, random.Random(args.seed)
    )
    serve(fd, line, stop)
    print(f"passed={line.passed} dropped={line.dropped} largest={line.largest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
