"""The one asyncio adapter: a UDP socket and a timer around a sans-I/O endpoint.

Everything protocol-related lives in :mod:`vcomp.protocol`; this module only
moves datagrams between the socket and the core, keeps one timer armed at the
core's next deadline and hands events to the application.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

from vcomp.protocol.events import Event

log = logging.getLogger(__name__)

Address = tuple[str, int]


class ServerCore(Protocol):
    def receive_datagram(self, data: bytes, address: Address, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...


class AgentCore(Protocol):
    def receive_datagram(self, data: bytes, now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[bytes]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...


class _Base(asyncio.DatagramProtocol):
    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self._on_event = on_event
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.closed.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) are normal for UDP; retransmission copes.
        log.debug("udp error: %s", exc)

    def kick(self) -> None:
        """Flush soon: call after feeding the core through the application API."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send(self._loop.time())
        self._drain_events()
        self._arm()

    def _send(self, now: float) -> None:
        raise NotImplementedError

    def _core_timer(self) -> float | None:
        raise NotImplementedError

    def _core_handle_timer(self, now: float) -> None:
        raise NotImplementedError

    def _core_event(self) -> Event | None:
        raise NotImplementedError

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
        self._core_handle_timer(self._loop.time())
        self._flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._transport.close()


class ServerAdapter(_Base):
    def __init__(self, core: ServerCore, on_event: Callable[[Event], None]) -> None:
        super().__init__(on_event)
        self.core = core

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.core.receive_datagram(data, (str(addr[0]), int(addr[1])), self._loop.time())
        self.kick()

    def _send(self, now: float) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for data, address in self.core.datagrams_to_send(now):
            transport.sendto(data, address)

    def _core_timer(self) -> float | None:
        return self.core.get_timer()

    def _core_handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def _core_event(self) -> Event | None:
        return self.core.next_event()


class AgentAdapter(_Base):
    def __init__(self, core: AgentCore, on_event: Callable[[Event], None]) -> None:
        super().__init__(on_event)
        self.core = core

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.core.receive_datagram(data, self._loop.time())
        self.kick()

    def _send(self, now: float) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for data in self.core.datagrams_to_send(now):
            transport.sendto(data)

    def _core_timer(self) -> float | None:
        return self.core.get_timer()

    def _core_handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def _core_event(self) -> Event | None:
        return self.core.next_event()
