"""UDP segmentation offload (GSO) and receive coalescing (GRO) for the adapter.

GSO: one ``sendmsg`` with a ``UDP_SEGMENT`` control message hands the kernel a train
of equal-size datagrams for one peer (the last may be shorter); the kernel cuts it
into separate datagrams on the wire. GRO: with ``UDP_GRO`` set, one ``recvmsg`` may
return several datagrams glued together, and the control message says the segment
size to cut them apart at. Both save a system call per datagram.

Both are Linux-only and detected at run time; ``VCOMP_UDP_OFFLOAD=off`` turns them
off (the bench compares the two).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

# Python 3.11 does not export these; the values are Linux's (include/uapi/linux/udp.h).
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)

# The kernel's UDP_MAX_SEGMENTS is 64 on older kernels; a train also stays below the
# largest IPv4 UDP payload (65507 bytes).
MAX_SEGMENTS = 64
MAX_TRAIN_BYTES = 65000
# A coalesced read never exceeds the largest UDP payload; one int of control data.
GRO_BUFFER = 65535
GRO_CONTROL = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0

OFFLOAD_ENV = "VCOMP_UDP_OFFLOAD"
_OFF_VALUES = {"off", "0", "no", "false"}
# sendmsg errors that mean "this path cannot do GSO" (no checksum offload on the
# device, a segment larger than the MTU, an old kernel): fall back and remember.
GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class Offload:
    """One feature's state: ``active``, ``off`` (switched off) or ``unavailable``."""

    status: str
    reason: str

    @property
    def active(self) -> bool:
        return self.status == "active"


def offload_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(OFFLOAD_ENV, "on").strip().lower() not in _OFF_VALUES


def switched_off() -> Offload:
    return Offload("off", f"{OFFLOAD_ENV}=off")


def probe_gso(sock: socket.socket) -> Offload:
    """Whether the kernel knows UDP_SEGMENT on ``sock`` (a send may still refuse it)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError as exc:
        return Offload("unavailable", f"UDP_SEGMENT: {exc.strerror or exc}")
    return Offload("active", "one sendmsg per train of up to 64 datagrams")


def enable_gro(sock: socket.socket) -> Offload:
    if GRO_CONTROL == 0:
        return Offload("unavailable", "no ancillary data on this platform")
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError as exc:
        return Offload("unavailable", f"UDP_GRO: {exc.strerror or exc}")
    return Offload("active", "one recvmsg may return up to 64 coalesced datagrams")


def gro_segment_size(ancdata: Sequence[tuple[int, int, bytes]]) -> int | None:
    """The segment size from a UDP_GRO control message, or None (not coalesced)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(data) >= 4:
                (size,) = struct.unpack_from("=i", data)
            elif len(data) >= 2:
                (size,) = struct.unpack_from("=H", data)
            else:
                return None
            return int(size) if size > 0 else None
    return None


def split_segments(buffer: memoryview, segment: int | None) -> Iterator[memoryview]:
    """Cut a coalesced read into the datagrams the peer sent: ``segment`` bytes each,
    the last one possibly shorter. No segment size: the buffer is one datagram."""
    size = len(buffer)
    if segment is None or segment <= 0 or segment >= size:
        yield buffer
        return
    for start in range(0, size, segment):
        yield buffer[start : start + segment]


def send_train(
    sock: socket.socket,
    datagrams: Sequence[bytes],
    segment: int,
    address: tuple[str, int] | None,
) -> int:
    """One sendmsg for the whole train; raises what sendmsg raises (all or nothing)."""
    control = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))]
    if address is None:
        return sock.sendmsg(datagrams, control)
    return sock.sendmsg(datagrams, control, 0, address)


def probe_loopback() -> tuple[Offload, Offload]:
    """(gso, gro) as this machine really does them: a two-segment train sent over
    127.0.0.1 must arrive as sent (for ``vcomp-agent doctor``)."""
    if not offload_wanted():
        return switched_off(), switched_off()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2.0)
        gso, gro = probe_gso(tx), enable_gro(rx)
        if not gso.active:
            return gso, gro
        sent = [b"a" * 100, b"b" * 60]
        try:
            send_train(tx, sent, 100, rx.getsockname())
        except OSError as exc:
            return Offload("unavailable", f"sendmsg with UDP_SEGMENT: {exc.strerror}"), gro
        received: list[bytes] = []
        coalesced = False
        buffer = bytearray(GRO_BUFFER)
        try:
            while len(received) < len(sent):
                n, ancdata, _, _ = rx.recvmsg_into([buffer], GRO_CONTROL or 64)
                segment = gro_segment_size(ancdata)
                coalesced = coalesced or segment is not None
                received += [bytes(s) for s in split_segments(memoryview(buffer)[:n], segment)]
        except OSError as exc:
            return Offload("unavailable", f"train did not arrive: {exc}"), gro
        if received != sent:
            return Offload("failed", f"train arrived as {[len(r) for r in received]}"), gro
        if gro.active and not coalesced:
            gro = Offload("active", "enabled; loopback did not coalesce this train")
        return gso, gro
