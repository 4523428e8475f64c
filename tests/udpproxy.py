"""A fault-injecting UDP proxy on loopback, for tests that want a hostile network.

Agents send to :attr:`UdpProxy.address`; the proxy forwards to the server from one
upstream socket per agent (as a NAT would), so the server still sees a distinct
address per agent. In each direction it can drop, duplicate, delay, reorder (by
holding a datagram back while later ones overtake it) and corrupt datagrams, all
decided by one seeded ``random.Random``. It can also capture every datagram it
sees, cut the link, hold datagrams back and release them later, inject crafted
datagrams, rebind an agent to a new upstream port, and pass each datagram through
a ``tamper`` hook for targeted attacks.

    async with UdpProxy(server_addr, to_server=Faults(drop=0.2), seed=7) as proxy:
        agent = connect_to(proxy.address)
        ...
        proxy.cut()                # black-hole both directions
        proxy.restore()
        attest = proxy.first(Direction.TO_SERVER, ptype=0x04)

The seed fixes the sequence of fault decisions, not their timing: which datagram
meets which decision still depends on the event loop's scheduling.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

Address = tuple[str, int]

HEADER_TYPE_OFFSET = 3  # vcomp wire header: magic(2) version(1) type(1) ...


class Direction(enum.Enum):
    TO_SERVER = "to_server"
    TO_AGENT = "to_agent"


@dataclass(frozen=True, slots=True)
class Faults:
    """What happens to datagrams travelling one way. Probabilities are per datagram."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # held back for a random time in reorder_delay
    reorder_delay: tuple[float, float] = (0.002, 0.03)
    corrupt: float = 0.0  # 1-3 random bytes XORed with a non-zero value
    delay: float = 0.0  # fixed one-way latency added to every datagram

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder", "corrupt"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        lo, hi = self.reorder_delay
        if not 0.0 <= lo <= hi:
            raise ValueError(f"reorder_delay must be 0 <= lo <= hi, got {self.reorder_delay}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")

    @property
    def clean(self) -> bool:
        return self == Faults()


NO_FAULTS = Faults()


@dataclass(frozen=True, slots=True)
class Captured:
    """One datagram as the proxy received it, before any fault was applied."""

    direction: Direction
    client: Address  # the agent's address as the proxy sees it
    data: bytes
    at: float  # event-loop time

    @property
    def ptype(self) -> int | None:
        return self.data[HEADER_TYPE_OFFSET] if len(self.data) > HEADER_TYPE_OFFSET else None


#: Called with every datagram after cut/drop checks and before the random faults.
#: Return the datagram(s) to forward instead: ``None`` or ``[]`` drops it.
Tamper = Callable[[Direction, Address, bytes], bytes | Iterable[bytes] | None]


@dataclass
class ProxyStats:
    to_server: Counter[str] = field(default_factory=Counter)
    to_agent: Counter[str] = field(default_factory=Counter)

    def of(self, direction: Direction) -> Counter[str]:
        return self.to_server if direction is Direction.TO_SERVER else self.to_agent


class _Upstream(asyncio.DatagramProtocol):
    """The socket one agent's traffic leaves from towards the server."""

    def __init__(self, proxy: UdpProxy, client: Address) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.proxy._arrive(Direction.TO_AGENT, self.client, data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the server is down: keep going


class _Front(asyncio.DatagramProtocol):
    """The socket agents talk to."""

    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.proxy._from_client(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass


class UdpProxy:
    def __init__(
        self,
        upstream: Address,
        *,
        to_server: Faults = NO_FAULTS,
        to_agent: Faults = NO_FAULTS,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        capture: bool = False,
        tamper: Tamper | None = None,
    ) -> None:
        self.upstream = upstream
        self.faults = {Direction.TO_SERVER: to_server, Direction.TO_AGENT: to_agent}
        self.rng = random.Random(seed)
        self.capture = capture
        self.captured: list[Captured] = []
        self.tamper = tamper
        self.stats = ProxyStats()
        self._bind = (host, port)
        self._cut: set[Direction] = set()
        self._hold: set[Direction] = set()
        self.held: list[Captured] = []
        self._front: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Address, _Upstream] = {}
        self._connecting: dict[Address, asyncio.Task[_Upstream]] = {}
        self._backlog: dict[Address, list[bytes]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False
        self.address: Address = ("", 0)

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> Address:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=self._bind
        )
        self._front = cast(asyncio.DatagramTransport, transport)
        host, port = self._front.get_extra_info("sockname")[:2]
        self.address = (str(host), int(port))
        return self.address

    async def close(self) -> None:
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in self._connecting.values():
            task.cancel()
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        self._upstreams.clear()
        if self._front is not None:
            self._front.close()
        await asyncio.sleep(0)

    async def __aenter__(self) -> UdpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- control -------------------------------------------------------------

    def set_faults(
        self,
        faults: Faults | None = None,
        *,
        to_server: Faults | None = None,
        to_agent: Faults | None = None,
    ) -> None:
        """``faults`` sets both directions; the keywords set one."""
        if faults is not None:
            self.faults = {Direction.TO_SERVER: faults, Direction.TO_AGENT: faults}
        if to_server is not None:
            self.faults[Direction.TO_SERVER] = to_server
        if to_agent is not None:
            self.faults[Direction.TO_AGENT] = to_agent

    def cut(self, direction: Direction | None = None) -> None:
        """Drop everything (one direction, or both), as if the cable were pulled."""
        self._cut |= set(Direction) if direction is None else {direction}

    def restore(self, direction: Direction | None = None) -> None:
        self._cut -= set(Direction) if direction is None else {direction}

    def hold(self, direction: Direction | None = None) -> None:
        """Keep datagrams back (in :attr:`held`) instead of forwarding them."""
        self._hold |= set(Direction) if direction is None else {direction}

    def release(self, direction: Direction | None = None) -> list[Captured]:
        """Stop holding and forward what was held, in order; returns what was sent."""
        self._hold -= set(Direction) if direction is None else {direction}
        out = [c for c in self.held if c.direction not in self._hold]
        self.held = [c for c in self.held if c.direction in self._hold]
        for c in out:
            self._deliver(c.direction, c.client, c.data)
        return out

    @property
    def clients(self) -> list[Address]:
        return list(self._upstreams)

    def upstream_address(self, client: Address) -> Address | None:
        """The address the server sees for ``client``."""
        up = self._upstreams.get(client)
        if up is None or up.transport is None:
            return None
        host, port = up.transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    async def rebind(self, client: Address) -> Address:
        """Move ``client`` to a fresh upstream port (NAT rebinding); returns the new one."""
        old = self._upstreams.pop(client, None)
        if old is not None and old.transport is not None:
            old.transport.close()
        await self._ensure_upstream(client)
        address = self.upstream_address(client)
        assert address is not None
        return address

    def inject(self, direction: Direction, data: bytes, client: Address | None = None) -> None:
        """Send a crafted datagram now, bypassing faults, cut and capture.

        ``client`` picks the agent whose path it travels (default: the first one seen).
        """
        if client is None:
            if not self._upstreams:
                raise RuntimeError("no agent has talked through this proxy yet")
            client = next(iter(self._upstreams))
        self._deliver(direction, client, data)

    # ---- capture -------------------------------------------------------------

    def datagrams(self, direction: Direction, *, ptype: int | None = None) -> list[Captured]:
        return [
            c
            for c in self.captured
            if c.direction is direction and (ptype is None or c.ptype == ptype)
        ]

    def first(self, direction: Direction, *, ptype: int | None = None) -> Captured:
        found = self.datagrams(direction, ptype=ptype)
        if not found:
            raise LookupError(f"no {direction.value} datagram of type {ptype} captured")
        return found[0]

    # ---- the path ------------------------------------------------------------

    def _from_client(self, data: bytes, client: Address) -> None:
        if client not in self._upstreams:
            self._ensure_upstream(client)
        self._arrive(Direction.TO_SERVER, client, data)

    def _ensure_upstream(self, client: Address) -> asyncio.Task[_Upstream]:
        task = self._connecting.get(client)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(client))
            self._connecting[client] = task
        return task

    async def _connect(self, client: Address) -> _Upstream:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _Upstream(self, client), remote_addr=self.upstream
            )
        finally:
            self._connecting.pop(client, None)
        self._upstreams[client] = protocol
        for data in self._backlog.pop(client, []):
            self._deliver(Direction.TO_SERVER, client, data)
        return protocol

    def _arrive(self, direction: Direction, client: Address, data: bytes) -> None:
        if self._closed:
            return
        stats = self.stats.of(direction)
        stats["received"] += 1
        if self.capture:
            loop = asyncio.get_running_loop()
            self.captured.append(Captured(direction, client, data, loop.time()))
        if direction in self._cut:
            stats["cut"] += 1
            return
        if direction in self._hold:
            stats["held"] += 1
            self.held.append(Captured(direction, client, data, asyncio.get_running_loop().time()))
            return
        outgoing: list[bytes] = [data]
        if self.tamper is not None:
            result = self.tamper(direction, client, data)
            if result is None:
                outgoing = []
            elif isinstance(result, bytes | bytearray):
                outgoing = [bytes(result)]
            else:
                outgoing = [bytes(d) for d in result]
            if outgoing != [data]:
                stats["tampered"] += 1
        for datagram in outgoing:
            self._apply_faults(direction, client, datagram)

    def _apply_faults(self, direction: Direction, client: Address, data: bytes) -> None:
        faults = self.faults[direction]
        stats = self.stats.of(direction)
        if faults.clean:
            self._deliver(direction, client, data)
            return
        rng = self.rng
        if rng.random() < faults.drop:
            stats["dropped"] += 1
            return
        if rng.random() < faults.corrupt and data:
            data = self._corrupt(data)
            stats["corrupted"] += 1
        copies = 1
        if rng.random() < faults.duplicate:
            copies = 2
            stats["duplicated"] += 1
        for _ in range(copies):
            delay = faults.delay
            if rng.random() < faults.reorder:
                delay += rng.uniform(*faults.reorder_delay)
                stats["reordered"] += 1
            self._later(delay, direction, client, data)

    def _corrupt(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            buf[self.rng.randrange(len(buf))] ^= self.rng.randint(1, 255)
        return bytes(buf)

    def _later(self, delay: float, direction: Direction, client: Address, data: bytes) -> None:
        if delay <= 0:
            self._deliver(direction, client, data)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            assert handle is not None
            self._timers.discard(handle)
            self._deliver(direction, client, data)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _deliver(self, direction: Direction, client: Address, data: bytes) -> None:
        if self._closed:
            return
        stats = self.stats.of(direction)
        if direction is Direction.TO_AGENT:
            if self._front is not None:
                self._front.sendto(data, client)
                stats["forwarded"] += 1
            return
        up = self._upstreams.get(client)
        if up is None or up.transport is None:
            self._backlog.setdefault(client, []).append(data)  # socket still opening
            return
        up.transport.sendto(data)
        stats["forwarded"] += 1
