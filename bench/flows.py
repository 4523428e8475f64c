"""Competing flows on one path, measured where the bytes arrive (issue 10 tests (b), (c), (e)).

The receiving side counts *application* bytes: for a vcomp flow the job bytes its
session has taken in order (CODE that passed the AEAD, the reliability layer and the
offset check), for TCP the bytes ``read`` returned. :class:`Sampler` reads every
flow's count at the same instants (every :data:`SAMPLE_INTERVAL` s), so shares over
a window are comparable between flows whatever the machine's load.

Arithmetic on the samples (:func:`window_bytes`, :func:`jain_index`) is pure and
used by both ``bench/bench_impaired.py`` and ``tests/netns``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev

SAMPLE_INTERVAL = 0.5
FIRST_BYTE_INTERVAL = 0.1
"""A fleet notes each agent's first job byte this often (its per-agent timeline)."""
TCP_READ = 256 * 1024


class Flow:
    """One receiver: application bytes delivered so far, and when it began and ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started: float | None = None
        self.finished: float | None = None
        self.failed: str | None = None

    async def start(self) -> None:
        raise NotImplementedError

    def delivered(self) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


MakeAgent = Callable[[Callable[[ev.Event], None]], LiteAgent]


class VcompFlow(Flow):
    """A protocol-only agent receiving jobs: the bytes of jobs complete plus the job in
    progress. ``finished`` is when its first job was complete (a competing flow has one)."""

    def __init__(self, name: str, make_agent: MakeAgent) -> None:
        super().__init__(name)
        self.connected_at: float | None = None  # the handshake done (attested, keyed)
        self.first_byte_at: float | None = None  # first job byte seen (fleet: per sample)
        self.handshake_retries = 0  # handshake datagrams sent again
        self.received_at: list[float] = []  # JobReceived: code and input complete, END checked
        self.committed = 0
        self.jobs_bytes = 0
        self.agent = make_agent(self.on_event)

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Connected) and self.connected_at is None:
            self.connected_at = time.monotonic()
        elif isinstance(e, ev.HandshakeRetry):
            self.handshake_retries += 1
        elif isinstance(e, ev.JobReceived):
            now = time.monotonic()
            self.received_at.append(now)
            self.jobs_bytes += len(e.code) + len(e.input)
            if self.finished is None:
                self.finished = now
        elif isinstance(e, ev.ResultCommitted):
            self.committed += 1
        elif isinstance(e, ev.Rejected | ev.SessionClosed) and self.failed is None:
            self.failed = repr(e)

    async def start(self) -> None:
        self.started = time.monotonic()
        await self.agent.start()

    def delivered(self) -> int:
        session = self.agent.session
        if session is None:
            return 0
        # The job being received: AgentSession has no public progress counter, and the
        # bench must not change the core for a measurement. Read directly (not getattr)
        # so that a rename fails loudly here instead of counting nothing.
        inbound = session._inbound
        return self.jobs_bytes + (inbound.received if inbound is not None else 0)

    async def stop(self) -> None:
        await self.agent.stop()


class TcpFlow(Flow):
    """A TCP receiver: sends one "go" byte, then reads until ``nbytes`` or stopped."""

    def __init__(self, name: str, host: str, port: int, nbytes: int) -> None:
        super().__init__(name)
        self.host, self.port, self.nbytes = host, port, nbytes
        self.count = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.started = time.monotonic()
        self.task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=TCP_READ)
        try:
            writer.write(b"g")
            while self.count < self.nbytes:
                chunk = await reader.read(TCP_READ)
                if not chunk:
                    self.failed = f"TCP stream ended after {self.count} of {self.nbytes} bytes"
                    return
                self.count += len(chunk)
            self.finished = time.monotonic()
        finally:
            writer.close()

    def delivered(self) -> int:
        return self.count

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class Samples:
    """Every flow's delivered bytes at common instants (``time.monotonic()`` of the
    receiving process), and each flow's start, end and failure."""

    names: list[str]
    times: list[float] = field(default_factory=list)
    delivered: list[list[int]] = field(default_factory=list)  # [sample][flow]
    started: list[float | None] = field(default_factory=list)
    finished: list[float | None] = field(default_factory=list)
    failed: list[str | None] = field(default_factory=list)


class Sampler:
    def __init__(self, flows: Sequence[Flow]) -> None:
        self.flows = list(flows)
        self.samples = Samples([f.name for f in flows])

    def sample(self) -> None:
        self.samples.times.append(time.monotonic())
        self.samples.delivered.append([f.delivered() for f in self.flows])

    async def run(self, seconds: float) -> None:
        """Sample every SAMPLE_INTERVAL until ``seconds`` have passed (ticks do not drift)."""
        begin = time.monotonic()
        ticks = int(seconds / SAMPLE_INTERVAL)
        self.sample()
        for i in range(1, ticks + 1):
            await asyncio.sleep(max(0.0, begin + i * SAMPLE_INTERVAL - time.monotonic()))
            self.sample()

    def result(self) -> Samples:
        s = self.samples
        s.started = [f.started for f in self.flows]
        s.finished = [f.finished for f in self.flows]
        s.failed = [f.failed for f in self.flows]
        return s


async def compete(flows: Sequence[Flow], starts: Sequence[float], seconds: float) -> Samples:
    """Start each flow ``starts[i]`` seconds in, sample them all for ``seconds``, stop them."""
    sampler = Sampler(flows)

    async def launch(flow: Flow, at: float) -> None:
        await asyncio.sleep(at)
        await flow.start()

    launches = [asyncio.create_task(launch(f, at)) for f, at in zip(flows, starts, strict=True)]
    try:
        await sampler.run(seconds)
        samples = sampler.result()  # before stopping: a stop closes sessions on purpose
    finally:
        for task in launches:
            task.cancel()
        await asyncio.gather(*launches, return_exceptions=True)
        await asyncio.gather(*(f.stop() for f in flows), return_exceptions=True)
    return samples


@dataclass
class FleetRun:
    """Many vcomp agents started at once until ``jobs`` results were committed."""

    begin: float
    received_at: list[float]  # every JobReceived of every agent
    connected_at: list[float | None]  # per agent
    job_bytes: int  # application bytes of all jobs received
    committed: int
    failed: list[str]
    samples: Samples  # the fleet's total delivered bytes (one column)
    timeline: list[AgentTimeline] = field(default_factory=list)  # per agent


@dataclass
class AgentTimeline:
    """One fleet agent's run (``time.monotonic()``; None: never happened)."""

    name: str
    connected: float | None  # handshake done
    first_byte: float | None  # first job byte in (within FIRST_BYTE_INTERVAL)
    received: float | None  # its job complete
    handshake_retries: int


async def fleet(agents: Sequence[VcompFlow], jobs: int, timeout: float) -> FleetRun:
    """Start every agent at once; wait until ``jobs`` results are committed (or ``timeout``,
    a safety net: the caller checks ``committed``), then stop them all."""
    total = _Total(agents)
    sampler = Sampler([total])
    begin = time.monotonic()

    def first_bytes() -> None:
        now = time.monotonic()
        for a in agents:
            if a.first_byte_at is None and a.delivered() > 0:
                a.first_byte_at = now

    try:
        await asyncio.gather(*(a.start() for a in agents))
        sampler.sample()
        every = round(SAMPLE_INTERVAL / FIRST_BYTE_INTERVAL)
        ticks = 0
        while sum(a.committed for a in agents) < jobs and time.monotonic() - begin < timeout:
            await asyncio.sleep(FIRST_BYTE_INTERVAL)
            first_bytes()
            ticks += 1
            if ticks % every == 0:
                sampler.sample()
        run = FleetRun(  # before stopping: a stop closes sessions on purpose
            begin=begin,
            received_at=sorted(t for a in agents for t in a.received_at),
            connected_at=[a.connected_at for a in agents],
            job_bytes=sum(a.jobs_bytes for a in agents),
            committed=sum(a.committed for a in agents),
            failed=[a.failed for a in agents if a.failed is not None],
            samples=sampler.result(),
            timeline=[
                AgentTimeline(
                    a.name,
                    a.connected_at,
                    a.first_byte_at,
                    a.received_at[0] if a.received_at else None,
                    a.handshake_retries,
                )
                for a in agents
            ],
        )
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
    return run


class _Total(Flow):
    """The sum of many flows, sampled as one."""

    def __init__(self, flows: Sequence[Flow]) -> None:
        super().__init__("total")
        self.flows = flows

    def delivered(self) -> int:
        return sum(f.delivered() for f in self.flows)

    async def stop(self) -> None:
        return None


# ---------------------------------------------------------------------- arithmetic


class OverlapTooShort(RuntimeError):
    """The samples do not hold the window asked for with every flow running."""


def window_bytes(samples: Samples, seconds: float) -> list[int]:
    """Bytes each flow delivered in the last ``seconds`` of sampling.

    Every flow must have delivered bytes before the window opens and be still
    running (not finished, not failed) when it closes: otherwise the window is not
    an overlap of all flows and the shares would mean nothing.
    """
    times = samples.times
    if not times or times[-1] - times[0] < seconds - SAMPLE_INTERVAL / 2:
        raise OverlapTooShort(f"sampled {times[-1] - times[0] if times else 0:.1f} s < {seconds}")
    end = len(times) - 1
    first = min(i for i, t in enumerate(times) if t >= times[end] - seconds - SAMPLE_INTERVAL / 2)
    for k, name in enumerate(samples.names):
        if samples.failed[k]:
            raise OverlapTooShort(f"flow {name} failed: {samples.failed[k]}")
        done = samples.finished[k]
        if done is not None and done <= times[end]:
            raise OverlapTooShort(f"flow {name} finished before the window closed")
        if samples.delivered[first][k] == 0:
            raise OverlapTooShort(f"flow {name} had delivered nothing when the window opened")
    return [
        samples.delivered[end][k] - samples.delivered[first][k] for k in range(len(samples.names))
    ]


def window_seconds(samples: Samples, seconds: float) -> float:
    """The exact span :func:`window_bytes` covers (sampling instants, not the ideal)."""
    times = samples.times
    first = min(i for i, t in enumerate(times) if t >= times[-1] - seconds - SAMPLE_INTERVAL / 2)
    return times[-1] - times[first]


def jain_index(shares: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one flow has everything."""
    total = sum(shares)
    squares = sum(x * x for x in shares)
    if squares == 0:
        return float("nan")
    return total * total / (len(shares) * squares)


def interval_jain(samples: Samples, seconds: float) -> list[float]:
    """Jain's index of each sampling interval in the last ``seconds`` (for the report)."""
    times = samples.times
    first = min(i for i, t in enumerate(times) if t >= times[-1] - seconds - SAMPLE_INTERVAL / 2)
    out = []
    for i in range(first + 1, len(times)):
        step = [b - a for a, b in zip(samples.delivered[i - 1], samples.delivered[i], strict=True)]
        if any(step):
            out.append(jain_index(step))
    return out
