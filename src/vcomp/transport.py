"""The one asyncio adapter: a UDP socket and a timer around a sans-I/O endpoint.

Everything protocol-related lives in :mod:`vcomp.protocol`; this module only
moves datagrams between a non-blocking socket and the core, keeps one timer
armed at the core's next deadline and hands events to the application.

It reads with ``add_reader`` and drains the socket on each wake-up (asyncio's
datagram transport reads one datagram per loop iteration), so a burst is fed
to the core at once and answered with one flush: fewer ACKs, fewer wake-ups.

Where the kernel has them (:mod:`vcomp.udp_offload`), a run of equal-size datagrams
for one peer leaves as one GSO ``sendmsg``, and a GRO read holding several datagrams
is cut back into them before the core sees any.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

from vcomp import udp_offload
from vcomp.protocol.events import Event
from vcomp.udp_offload import Offload

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_DATAGRAM = 2048
BATCH = 64
SOCKET_BUFFER = 4 << 20
_QUIET_ERRORS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}


class _TimerCore(Protocol):
    """What both kinds of core share: a deadline, a timer handler, an event queue."""

    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...


class ServerCore(Protocol):
    def receive_datagram(self, data: bytes, address: Address, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...


class AgentCore(Protocol):
    def receive_datagram(self, data: bytes, now: float) -> None: ...
    def port_unreachable(self, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[bytes]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        # The kernel may cap it (net.core.rmem_max); the default still works.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    return sock


def _offload(sock: socket.socket) -> tuple[Offload, Offload]:
    """(gso, gro) for this socket: probed now, unless VCOMP_UDP_OFFLOAD=off."""
    if not udp_offload.offload_wanted():
        return udp_offload.switched_off(), udp_offload.switched_off()
    return udp_offload.probe_gso(sock), udp_offload.enable_gro(sock)


class _Driver:
    """Socket + timer plumbing shared by both sides."""

    def __init__(self, sock: socket.socket, on_event: Callable[[Event], None]) -> None:
        self.sock = sock
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self._backlog: deque[tuple[bytes, Address | None]] = deque()
        self._writing = False
        self._paced_write: asyncio.TimerHandle | None = None
        self._paced_read: asyncio.TimerHandle | None = None
        self.closed = False
        # Traffic totals for /metrics, added once per read or write burst (not per datagram).
        self.datagrams_received = 0
        self.bytes_received = 0
        self.datagrams_sent = 0
        self.bytes_sent = 0
        self.datagrams_oversize = 0  # dropped: longer than any datagram the core accepts
        self.trains_sent = 0  # sendmsg calls that carried a GSO train
        self.reads_coalesced = 0  # GRO reads that held more than one datagram
        self.gso, self.gro = _offload(sock)
        self._gro_buffer = memoryview(bytearray(udp_offload.GRO_BUFFER if self.gro.active else 0))
        self._loop.add_reader(sock.fileno(), self._readable)

    # ---- subclass hooks ------------------------------------------------------

    def _feed(self, data: bytes, address: Address, now: float) -> None:
        raise NotImplementedError

    def _outgoing(self, now: float) -> list[tuple[bytes, Address | None]]:
        raise NotImplementedError

    def _timers(self) -> _TimerCore:
        raise NotImplementedError

    def _refused(self, now: float) -> None:
        """The kernel reported the peer's port closed (ICMP); only an agent acts on it."""

    def _send_delay(self, size: int, now: float) -> float:
        """Seconds to wait before sending ``size`` bytes (a rate cap); 0.0 sends now."""
        return 0.0

    def _receive_delay(self, now: float) -> float:
        """Seconds to wait before reading more (a rate cap); 0.0 reads now."""
        return 0.0

    def _received(self, size: int, now: float) -> None:
        """``size`` bytes were read (charged to a rate cap)."""

    def _core_timer(self) -> float | None:
        return self._timers().get_timer()

    def _core_handle_timer(self, now: float) -> None:
        self._timers().handle_timer(now)

    def _core_event(self) -> Event | None:
        return self._timers().next_event()

    # ---- reading -------------------------------------------------------------

    def _readable(self) -> None:
        if self.gro.active:
            self._readable_coalesced()
            return
        now = self._loop.time()
        count = size = 0
        for _ in range(BATCH):
            wait = self._receive_delay(now)
            if wait > 0:
                self._pause_reading(wait)
                break
            try:
                data, address = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._receive_error(exc, now)
                break
            self._received(len(data), now)
            count += 1
            size += len(data)
            self._feed(data, (str(address[0]), int(address[1])), now)
        self.datagrams_received += count
        self.bytes_received += size
        self.flush()

    def _readable_coalesced(self) -> None:
        """The GRO path: each recvmsg may hold a train; cut it at the segment size."""
        now = self._loop.time()
        count = size = 0
        buffer = self._gro_buffer
        for _ in range(BATCH):
            wait = self._receive_delay(now)
            if wait > 0:
                self._pause_reading(wait)
                break
            try:
                n, ancdata, _, address = self.sock.recvmsg_into([buffer], udp_offload.GRO_CONTROL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._receive_error(exc, now)
                break
            peer = (str(address[0]), int(address[1]))
            segment = udp_offload.gro_segment_size(ancdata)
            if segment is not None and segment < n:
                self.reads_coalesced += 1
            for view in udp_offload.split_segments(buffer[:n], segment):
                if len(view) > MAX_DATAGRAM:
                    self.datagrams_oversize += 1
                    continue
                self._received(len(view), now)
                count += 1
                size += len(view)
                self._feed(bytes(view), peer, now)
        self.datagrams_received += count
        self.bytes_received += size
        self.flush()

    def _receive_error(self, exc: OSError, now: float) -> None:
        # ICMP errors surface here on a connected socket; retransmission copes.
        if exc.errno == errno.ECONNREFUSED:
            self._refused(now)
        elif exc.errno not in _QUIET_ERRORS:
            log.debug("udp receive error: %s", exc)

    def _pause_reading(self, wait: float) -> None:
        # Unread datagrams wait in the kernel buffer; the peer's window stops on our ACKs.
        self._loop.remove_reader(self.sock.fileno())
        self._paced_read = self._loop.call_later(wait, self._resume_reading)

    def _resume_reading(self) -> None:
        self._paced_read = None
        if not self.closed:
            self._loop.add_reader(self.sock.fileno(), self._readable)
            self._readable()

    # ---- writing -------------------------------------------------------------

    def kick(self) -> None:
        """Flush soon: call after feeding the core through the application API."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what the core has queued now (say, the CLOSEs before :meth:`close`)."""
        self._flush_scheduled = False
        if self.closed:
            return
        self._backlog.extend(self._outgoing(self._loop.time()))
        self._write_backlog()
        self._drain_events()
        self._arm()

    def _write_backlog(self) -> None:
        backlog = self._backlog
        if self._paced_write is not None:
            return  # a paced write is due; it sends the backlog in order
        while backlog:
            run = self._train_at_head() if self.gso.active else 1
            # Charge the rate cap datagram by datagram; a train is cut where it says wait.
            now, ready, wait = self._loop.time(), 0, 0.0
            for data, _ in itertools.islice(backlog, run):
                wait = self._send_delay(len(data), now)
                if wait > 0:
                    break
                ready += 1
            if ready == 0:
                self._paced_write = self._loop.call_later(wait, self._paced_send)
                return
            if not self._send_head(ready):
                self._wait_writable()
                return

    def _train_at_head(self) -> int:
        """How many datagrams at the backlog's head form one GSO train: same peer, the
        first one's size (the last may be shorter), at most 64 and MAX_TRAIN_BYTES."""
        backlog = self._backlog
        segment, address = len(backlog[0][0]), backlog[0][1]
        count = total = 0
        for data, to in itertools.islice(backlog, udp_offload.MAX_SEGMENTS):
            if to != address or len(data) > segment:
                break
            if total + len(data) > udp_offload.MAX_TRAIN_BYTES:
                break
            count += 1
            total += len(data)
            if len(data) < segment:
                break  # a shorter datagram ends a train
        return count

    def _send_head(self, count: int) -> bool:
        """Send the backlog's first ``count`` datagrams (one train if count > 1) and drop
        them from it; False if the socket buffer is full (the rest stays queued)."""
        backlog = self._backlog
        if count > 1:
            train = [data for data, _ in itertools.islice(backlog, count)]
            address = backlog[0][1]
            try:
                udp_offload.send_train(self.sock, train, len(train[0]), address)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in udp_offload.GSO_UNSUPPORTED:
                    # This socket's path cannot segment: remember, send singly from now on.
                    self.gso = Offload("unavailable", f"sendmsg with UDP_SEGMENT: {exc.strerror}")
                    log.info("udp gso unavailable, sending datagrams singly: %s", exc.strerror)
                elif exc.errno != errno.EMSGSIZE:
                    if exc.errno not in _QUIET_ERRORS:
                        log.debug("udp send error: %s", exc)
                    for _ in range(count):
                        backlog.popleft()
                    return True
                # else: fall through and send this train singly
            else:
                self.trains_sent += 1
                self.datagrams_sent += count
                self.bytes_sent += sum(len(d) for d in train)
                for _ in range(count):
                    backlog.popleft()
                return True
        for _ in range(count):
            data, address = backlog[0]
            try:
                if address is None:
                    self.sock.send(data)
                else:
                    self.sock.sendto(data, address)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno not in _QUIET_ERRORS:
                    log.debug("udp send error: %s", exc)
            else:
                self.datagrams_sent += 1
                self.bytes_sent += len(data)
            backlog.popleft()
        return True

    def _wait_writable(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _paced_send(self) -> None:
        self._paced_write = None
        self.flush()  # the backlog first, then whatever the core has queued meanwhile

    def _writable(self) -> None:
        self._write_backlog()
        if not self._backlog and self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    # ---- events and timer ----------------------------------------------------

    def _drain_events(self) -> None:
        while (event := self._core_event()) is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("event handler failed for %s", type(event).__name__)

    def _arm(self) -> None:
        at = self._core_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        self._core_handle_timer(self._loop.time())
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for handle in (self._paced_write, self._paced_read):
            if handle is not None:
                handle.cancel()
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()

    @property
    def offload_summary(self) -> str:
        """For start-up lines and logs, e.g. ``gso=active gro=off``."""
        return f"gso={self.gso.status} gro={self.gro.status}"

    @property
    def local_address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)


class ServerAdapter(_Driver):
    def __init__(
        self, core: ServerCore, sock: socket.socket, on_event: Callable[[Event], None]
    ) -> None:
        self.core = core
        super().__init__(sock, on_event)

    def _feed(self, data: bytes, address: Address, now: float) -> None:
        self.core.receive_datagram(data, address, now)

    def _outgoing(self, now: float) -> list[tuple[bytes, Address | None]]:
        return list(self.core.datagrams_to_send(now))

    def _timers(self) -> _TimerCore:
        return self.core


class RateCap(Protocol):
    """A bytes-per-second cap (vcomp.agent.preferences.rate.TokenBucket); clock passed in."""

    def delay(self, now: float) -> float: ...
    def take(self, size: int, now: float) -> None: ...


class AgentAdapter(_Driver):
    """The agent's side. ``upload`` / ``download`` cap its bytes per second: sends wait
    for the bucket, and reads pause (so ACKs, and with them the server's window, slow)."""

    def __init__(
        self,
        core: AgentCore,
        sock: socket.socket,
        on_event: Callable[[Event], None],
        *,
        upload: RateCap | None = None,
        download: RateCap | None = None,
    ) -> None:
        self.core = core
        self._upload, self._download = upload, download
        super().__init__(sock, on_event)
        if download is not None and self.gro.active:
            # A coalesced read is up to 64 KB at once, past what the cap allows.
            sock.setsockopt(udp_offload.SOL_UDP, udp_offload.UDP_GRO, 0)
            self.gro = Offload("off", "max_download_rate reads one datagram at a time")
            self._gro_buffer = memoryview(bytearray(0))

    def _send_delay(self, size: int, now: float) -> float:
        if self._upload is None:
            return 0.0
        wait = self._upload.delay(now)
        if wait <= 0:
            self._upload.take(size, now)
        return wait

    def _receive_delay(self, now: float) -> float:
        return 0.0 if self._download is None else self._download.delay(now)

    def _received(self, size: int, now: float) -> None:
        if self._download is not None:
            self._download.take(size, now)

    def _feed(self, data: bytes, address: Address, now: float) -> None:
        self.core.receive_datagram(data, now)

    def _outgoing(self, now: float) -> list[tuple[bytes, Address | None]]:
        return [(d, None) for d in self.core.datagrams_to_send(now)]

    def _refused(self, now: float) -> None:
        self.core.port_unreachable(now)

    def _timers(self) -> _TimerCore:
        return self.core


async def open_server(
    core: ServerCore, on_event: Callable[[Event], None], host: str, port: int
) -> ServerAdapter:
    """Bind ``host:port`` (port 0: any free port) and serve ``core`` on it."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = _udp_socket(family)
    try:
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return ServerAdapter(core, sock, on_event)


async def open_agent(
    core: AgentCore,
    on_event: Callable[[Event], None],
    host: str,
    port: int,
    *,
    upload: RateCap | None = None,
    download: RateCap | None = None,
) -> AgentAdapter:
    """A socket connected to the server, so only its datagrams reach ``core``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = _udp_socket(family)
    try:
        sock.connect(sockaddr)
    except OSError:
        sock.close()
        raise
    return AgentAdapter(core, sock, on_event, upload=upload, download=download)
