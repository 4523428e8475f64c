"""A UDP relay between one agent and a server that records, holds and injects.

The agent is pointed at :attr:`CaptureProxy.address`; the proxy forwards its
datagrams to the server from its own upstream socket, so the server sees the
proxy's upstream address as the agent's address. That puts the test exactly
where an on-path attacker sits: it has every packet of the session, it can
send as the agent (:meth:`to_server`) or as the server (:meth:`to_agent`), and
it can hold the agent's packets back (:attr:`hold`) instead of delivering them,
and rewrite the server's in flight (:attr:`rewrite_to_agent`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

Address = tuple[str, int]


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable after the agent left: not interesting here


class CaptureProxy:
    def __init__(self, server: Address) -> None:
        self.server = server
        self.to_server_log: list[bytes] = []  # agent -> server, as forwarded
        self.to_agent_log: list[bytes] = []  # server -> agent, as forwarded
        self.held: list[bytes] = []  # agent -> server, kept back while hold is set
        self.hold = False
        self.hold_after: int | None = None  # start holding once the server sends this type
        self.rewrite_to_agent: Callable[[bytes], bytes] | None = None  # a tamper hook
        self.hold_when: Callable[[bytes], bool] | None = None  # start holding at this one
        self.agent_address: Address | None = None
        self._down: _Side | None = None
        self._up: _Side | None = None

    async def start(self) -> Address:
        loop = asyncio.get_running_loop()
        _, self._down = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_agent), local_addr=("127.0.0.1", 0)
        )
        _, self._up = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), remote_addr=self.server
        )
        return self.address

    @property
    def address(self) -> Address:
        """Where the agent sends (the proxy's downstream socket)."""
        assert self._down is not None and self._down.transport is not None
        host, port = self._down.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    @property
    def upstream_address(self) -> Address:
        """The address the server believes is the agent's."""
        assert self._up is not None and self._up.transport is not None
        host, port = self._up.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def _from_agent(self, data: bytes, addr: Address) -> None:
        self.agent_address = addr
        if self.hold_when is not None and self.hold_when(data):
            self.hold = True
        if self.hold:
            self.held.append(data)
            return
        self.to_server_log.append(data)
        self.to_server(data)

    def _from_server(self, data: bytes, addr: Address) -> None:
        if self.rewrite_to_agent is not None:
            data = self.rewrite_to_agent(data)
        self.to_agent_log.append(data)
        if self.hold_after is not None and len(data) > 3 and data[3] == self.hold_after:
            self.hold = True
        if self.agent_address is not None:
            self.to_agent(data)

    def to_server(self, data: bytes) -> None:
        """Send ``data`` to the server from the agent's (apparent) address."""
        assert self._up is not None and self._up.transport is not None
        self._up.transport.sendto(data)

    def to_agent(self, data: bytes) -> None:
        """Send ``data`` to the agent from the server's (apparent) address."""
        assert self._down is not None and self._down.transport is not None
        assert self.agent_address is not None
        self._down.transport.sendto(data, self.agent_address)

    def release(self) -> None:
        """Stop holding and deliver everything held, in order."""
        self.hold = False
        held, self.held = self.held, []
        for data in held:
            self.to_server_log.append(data)
            self.to_server(data)

    def close(self) -> None:
        for side in (self._down, self._up):
            if side is not None and side.transport is not None:
                side.transport.close()
