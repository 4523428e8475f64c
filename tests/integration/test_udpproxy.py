"""The fault proxy itself, against a plain UDP echo server (so its faults can be trusted)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from tests.integration.conftest import wait_until
from tests.udpproxy import Direction, Faults, UdpProxy

Address = tuple[str, int]


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.received: list[tuple[bytes, Address]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.received.append((data, (str(addr[0]), int(addr[1]))))
        if self.echo and self.transport is not None:
            self.transport.sendto(b"echo:" + data, addr)


async def endpoint(
    echo: bool, remote: Address | None = None
) -> tuple[_Collector, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    if remote is None:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Collector(echo), local_addr=("127.0.0.1", 0)
        )
    else:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Collector(echo), remote_addr=remote
        )
    return proto, cast(asyncio.DatagramTransport, transport)


@pytest.fixture
async def echo_path() -> Any:
    server, server_t = await endpoint(echo=True)
    proxies: list[UdpProxy] = []
    clients: list[asyncio.DatagramTransport] = []

    async def make(**kwargs: Any) -> tuple[UdpProxy, _Collector, asyncio.DatagramTransport]:
        proxy = UdpProxy(server_t.get_extra_info("sockname")[:2], **kwargs)
        proxies.append(proxy)
        await proxy.start()
        client, client_t = await endpoint(echo=False, remote=proxy.address)
        clients.append(client_t)
        return proxy, client, client_t

    yield server, make
    for t in clients:
        t.close()
    for p in proxies:
        await p.close()
    server_t.close()


async def test_clean_path_forwards_both_ways_from_one_upstream_per_agent(echo_path: Any) -> None:
    server, make = echo_path
    proxy, client, client_t = await make(capture=True)
    _, other, other_t = await make()
    for i in range(5):
        client_t.sendto(b"a%d" % i)
    other_t.sendto(b"b")
    await wait_until(lambda: len(client.received) == 5 and other.received, "echoes")
    assert [d for d, _ in client.received] == [b"echo:a%d" % i for i in range(5)]
    assert len({addr for _, addr in server.received}) == 2  # one upstream per agent
    assert [c.data for c in proxy.datagrams(Direction.TO_SERVER)] == [b"a%d" % i for i in range(5)]
    assert proxy.stats.to_agent["forwarded"] == 5


async def test_faults_are_applied_and_counted(echo_path: Any) -> None:
    server, make = echo_path
    faults = Faults(drop=0.3, duplicate=0.3, reorder=0.3, corrupt=0.3)
    proxy, _, client_t = await make(to_server=faults, seed=5)
    sent = [b"%04d" % i + b"." * 60 for i in range(400)]
    for data in sent:
        client_t.sendto(data)
        await asyncio.sleep(0)
    stats = proxy.stats.to_server
    await wait_until(lambda: stats["received"] == 400, "the proxy to see every datagram")
    expected = 400 - stats["dropped"] + stats["duplicated"]
    await wait_until(lambda: len(server.received) == expected, "every surviving datagram")
    for fault in ("dropped", "duplicated", "reordered", "corrupted"):
        assert 60 < stats[fault] < 180, (fault, stats)  # ~120 of 400 each
    got = [d for d, _ in server.received]
    assert sum(1 for d in got if d not in sent) > 0  # corrupted copies arrived
    order = [sent.index(d) for d in got if d in sent]
    assert order != sorted(order)  # reordered


async def test_cut_hold_release_inject_and_rebind(echo_path: Any) -> None:
    server, make = echo_path
    proxy, client, client_t = await make()
    client_t.sendto(b"first")
    await wait_until(lambda: client.received, "the first echo")
    agent = proxy.clients[0]
    first_upstream = proxy.upstream_address(agent)

    proxy.cut()
    client_t.sendto(b"lost")
    await wait_until(lambda: proxy.stats.to_server["cut"] == 1, "the cut datagram")
    proxy.restore()

    proxy.hold(Direction.TO_SERVER)
    client_t.sendto(b"held1")
    client_t.sendto(b"held2")
    await wait_until(lambda: len(proxy.held) == 2, "two held datagrams")
    assert [d for d, _ in server.received] == [b"first"]
    assert [c.data for c in proxy.release()] == [b"held1", b"held2"]
    await wait_until(lambda: len(server.received) == 3, "the released datagrams")

    proxy.inject(Direction.TO_AGENT, b"forged", agent)
    await wait_until(lambda: any(d == b"forged" for d, _ in client.received), "the injection")

    new_upstream = await proxy.rebind(agent)
    assert new_upstream != first_upstream
    client_t.sendto(b"after")
    await wait_until(lambda: server.received[-1][0] == b"after", "the rebound datagram")
    assert server.received[-1][1] == new_upstream


async def test_tamper_hook_rewrites_datagrams(echo_path: Any) -> None:
    server, make = echo_path

    def tamper(direction: Direction, agent: Address, data: bytes) -> list[bytes] | None:
        if data == b"drop me":
            return None
        return [data.upper(), data]

    _, _, client_t = await make(tamper=tamper)
    client_t.sendto(b"drop me")
    client_t.sendto(b"twice")
    await wait_until(lambda: len(server.received) == 2, "the tampered datagrams")
    assert [d for d, _ in server.received] == [b"TWICE", b"twice"]
