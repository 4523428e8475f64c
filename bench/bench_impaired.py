"""Server -> agent transfer over a real impaired link: network namespaces, veths, tc.

    python bench/bench_impaired.py [--quick] [--json PATH] [--runs N] [--many RUNS]

The server (:class:`OrganisationServer` on uvloop, SQLite store) runs in a spawned
process inside namespace a, bound to 10.213.0.1; a protocol-only
:class:`~vcomp.loadgen.LiteAgent` runs in a spawned process inside namespace b.
``tc netem`` on both veth ends (so ACKs suffer too) applies each profile:
10 ms delay + 1% loss, then 20 ms delay + 5% loss (RTT 20 and 40 ms). Where the
kernel has no netem, the same delay and loss come from the user-space delay line of
``tests/netns/bottleneck.py`` (a router namespace between the two). The last
profile is always on that path: a 20 Mbit/s bottleneck at 40 ms RTT with a queue
of one bandwidth-delay product (issue 10's test (a) link); its ``link use`` column
is the goodput as a share of the link rate.

Rows per profile: vcomp at window 1 (the paper's stop-and-wait), vcomp at its
default window, and plain TCP (asyncio streams) moving the same bytes between the
same namespaces. The blob is 4 MiB (``--quick``: 1 MiB); window 1 moves 256 KiB
(``--quick``: 64 KiB) because one 1200-byte chunk per round trip runs at about
30-60 KB/s here, so a 4 MiB blob would only cost minutes.

Timing is on the agent's side: vcomp from the end of the handshake (``Connected``)
to ``JobReceived`` (code and input complete, END checked), TCP from the receiver's
one-byte "go" on the established connection to the last byte. Both include one
round trip before the first data byte (READY -> START; "go" -> first segment), and
neither includes connection setup. Median of ``--runs``
(3; ``--quick``: 1). Without root, namespaces or netem it prints why and skips.

A second table puts competing flows on the 20 Mbit/s path (issue 10 tests (b), (c)
and (e); the same measurements as ``tests/netns/test_competing_flows.py``), counted
where the bytes arrive (``bench/flows.py``): two vcomp flows 5 s apart (Jain's
index over the last 20 s), vcomp against Linux CUBIC each way round (vcomp:TCP),
and 200 agents started at once, one 256 KiB job each (goodput to the last job as a
share of the link). ``--quick`` halves the window and runs 50 agents.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, flows
from bench.netns import A_ADDR, Bottleneck, NetnsPair, PathSpec, enter, probe, tcp_counters

from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import limits
from vcomp.server import config as config_defaults
from vcomp.server.config import init_server_home, load_server_config
from vcomp.server.service import OrganisationServer

MIB = 1 << 20
KIB = 1 << 10
DEFAULT_WINDOW = config_defaults.DEFAULT_WINDOW  # flow control only: cwnd sizes the flight


@dataclass(frozen=True)
class Profile:
    """A path: ``netem`` on both egresses where the kernel has it (None: never), else
    ``path`` through the delay line; ``link_bytes_s`` is the rate limit, if any."""

    name: str
    netem: list[str] | None
    path: PathSpec
    link_bytes_s: float | None = None
    flow_seconds: float | None = None  # full runs: size the blob to this long on the link


PROFILES: tuple[Profile, ...] = (
    Profile(
        "10 ms + 1% loss",
        ["delay", "10ms", "loss", "1%"],
        PathSpec(rate=None, rtt_ms=20.0, loss=0.01),
    ),
    Profile(
        "20 ms + 5% loss",
        ["delay", "20ms", "loss", "5%"],
        PathSpec(rate=None, rtt_ms=40.0, loss=0.05),
    ),
    Profile(
        "20 Mbit/s, 40 ms, 1-BDP queue",
        None,
        PathSpec(rate="20mbit", rtt_ms=40.0, queue_bytes=100_000),
        link_bytes_s=20e6 / 8,
        flow_seconds=20.0,  # issue 10 test (a): goodput over 20 s
    ),
)
# Issue 10 test (d): 2 KB jobs one after another at 40 ms RTT and 1% loss each way.
SMALL_JOBS_PATH = PathSpec(rate=None, rtt_ms=40.0, loss=0.01)
SMALL_JOB_BYTES = 2048
SMALL_JOBS = 200
RUN_TIMEOUT = 300.0
TCP_READ = 256 * KIB
TCP_CONGESTION = b"cubic"


@dataclass
class Row:
    profile: str
    impairment: str
    transport: str
    window: int | None
    size: int
    seconds: list[float] = field(default_factory=list)
    ratio_tcp: float = float("nan")
    link_use: float | None = None

    @property
    def median_seconds(self) -> float:
        return common.median(self.seconds)

    @property
    def mb_s(self) -> float:
        return self.size / self.median_seconds / 1e6

    def figures(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(median_seconds=self.median_seconds, mb_s=self.mb_s)
        return out


# ---------------------------------------------------------------------- namespace a: servers


class _ServerSide:
    """Commands run inside namespace a: one vcomp server or one TCP sender at a time."""

    def __init__(self) -> None:
        self.home: Path | None = None
        self.server: OrganisationServer | None = None
        self.tcp: asyncio.Server | None = None
        self.senders: set[asyncio.Task[Any]] = set()

    async def handle(self, command: tuple[Any, ...]) -> Any:
        kind, *args = command
        if kind == "vcomp_start":
            return await self._vcomp_start(*args)
        if kind == "tcp_start":
            return await self._tcp_start(*args)
        if kind == "batch":
            return await self._batch()
        if kind == "stop":
            await self._stop()
            return None
        raise ValueError(f"unknown command {kind!r}")

    async def _vcomp_start(
        self, window: int, blob: bytes, jobs: int, sessions: int = 1
    ) -> common.AgentIdentity:
        """A server with ``jobs`` jobs of ``blob``; one enrolled TPM for ``sessions``
        agents at once (a bench shortcut: enrolling 200 TPMs costs 25 s)."""
        self.home = Path(tempfile.mkdtemp(prefix="vcomp-impaired-"))
        fingerprint = init_server_home(self.home / "server")
        config = load_server_config(self.home / "server")
        config = dataclasses.replace(
            config,
            bind_host=A_ADDR,
            bind_port=0,
            window=window,
            max_sessions_per_agent=max(sessions, config.max_sessions_per_agent),
            max_leases_per_agent=max(sessions, config.max_leases_per_agent),
        )
        server = self.server = OrganisationServer(config)
        server.store.allow_measurement(golden_measurement(common.POLICY).format(), "bench")
        tpm_dir = self.home / "tpm"
        e = parse_enrolment(format_enrolment(SimulatedTpm.open(tpm_dir), "impaired"))
        server.store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
        code = self.home / "blob.bin"
        code.write_bytes(blob)
        server.store.add_app("blob", "python", code)
        server.store.create_batch("blob", [b"{}"] * jobs, wall_seconds=60)
        address = await server.start()
        return common.AgentIdentity(str(tpm_dir), fingerprint, address)

    async def _tcp_start(self, payload: bytes) -> int:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.senders.add(task)
            task.add_done_callback(self.senders.discard)
            try:
                await reader.readexactly(1)  # "go": like vcomp's READY before START
                writer.write(payload)
                await writer.drain()
                await reader.read(1)  # the receiver closes once it has everything
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # a competing-flows run stops its receivers mid-transfer
            finally:
                writer.close()

        self.tcp = await asyncio.start_server(send, A_ADDR, 0)
        listener = self.tcp.sockets[0]
        # Linux CUBIC, whatever the host's default; accepted connections inherit it.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, TCP_CONGESTION)
        port: int = listener.getsockname()[1]
        return port

    async def _batch(self) -> dict[str, int]:
        """The store's count of the batch's jobs (done, failed, queued, leased, total)
        and the packets the server sent again."""
        server = self.server
        assert server is not None and server.endpoint is not None
        store = server.store
        status = await server.committer.run(lambda: store.batch_status(store.newest_batch_id()))
        return {
            "total": status.total,
            "done": status.done,
            "failed": status.failed,
            "queued": status.queued,
            "leased": status.leased,
            "retransmissions": server.endpoint.retransmissions(),
        }

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.senders:  # the receiver's FIN may still be crossing a slow path
            await asyncio.wait(self.senders, timeout=RUN_TIMEOUT)
        if self.tcp is not None:
            self.tcp.close()
            await self.tcp.wait_closed()
            self.tcp = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


def server_side_main(ns: str, conn: Connection) -> None:
    enter(ns)  # before the event loop and its executor threads exist
    common.serve_commands(conn, _ServerSide().handle)


# ---------------------------------------------------------------------- namespace b: receivers


def _no_work(job: ev.JobReceived) -> bytes:
    return b"received"


class _AgentSide:
    def __init__(self) -> None:
        self._tpms: dict[str, SimulatedTpm] = {}
        self._ephemeral = common.ephemeral_pool(1)[0]

    async def handle(self, command: tuple[Any, ...]) -> Any:
        kind, *args = command
        if kind == "vcomp":
            return await self._vcomp(*args)
        if kind == "tcp":
            return await self._tcp(*args)
        if kind == "small_jobs":
            return await self._small_jobs(*args)
        if kind == "compete":
            return await self._compete(*args)
        if kind == "fleet":
            return await self._fleet(*args)
        raise ValueError(f"unknown command {kind!r}")

    async def _small_jobs(self, identity: common.AgentIdentity, jobs: int) -> Any:
        """Seconds between consecutive commits (each: READY/ACK -> START, CODE, END,
        RESULT, committed ACK), and the session's PTO at the end."""
        commits: list[float] = []
        finished = asyncio.Event()

        def on_event(e: ev.Event) -> None:
            if isinstance(e, ev.Connected | ev.ResultCommitted):
                commits.append(time.monotonic())
                if len(commits) > jobs:
                    finished.set()
            elif isinstance(e, ev.Rejected | ev.SessionClosed):
                finished.set()

        agent = self._agent(identity, on_event)
        await agent.start()
        try:
            await asyncio.wait_for(finished.wait(), RUN_TIMEOUT)
            channel = agent.session.channel if agent.session is not None else None
            pto = channel.stats["rto"] if channel is not None else float("nan")
        finally:
            await agent.stop()
        if len(commits) <= jobs:
            raise RuntimeError(f"only {len(commits) - 1} of {jobs} small jobs committed")
        return [b - a for a, b in itertools.pairwise(commits)], pto

    def _agent(
        self, identity: common.AgentIdentity, on_event: Callable[[ev.Event], None]
    ) -> LiteAgent:
        """A protocol-only agent of ``identity`` (its TPM opened once per run)."""
        tpm = self._tpms.get(identity.tpm_dir)
        if tpm is None:
            tpm = self._tpms[identity.tpm_dir] = common.open_agent_tpm(identity.tpm_dir)
        return LiteAgent(
            tpm=tpm,
            pinned=identity.pinned,
            server=identity.server,
            ephemeral=self._ephemeral,
            compute=_no_work,
            on_event=on_event,
        )

    async def _compete(self, specs: Sequence[tuple[Any, ...]], seconds: float) -> flows.Samples:
        """Flows started at their offsets and sampled together: each spec is
        ``("vcomp", identity, at)`` or ``("tcp", host, port, nbytes, at)``."""
        competing: list[flows.Flow] = []
        for i, (kind, *args) in enumerate(specs):
            if kind == "vcomp":
                make = functools.partial(self._agent, args[0])
                competing.append(flows.VcompFlow(f"vcomp{i}", make))
            else:
                competing.append(flows.TcpFlow(f"tcp{i}", *args[:3]))
        return await flows.compete(competing, [spec[-1] for spec in specs], seconds)

    async def _fleet(self, identity: common.AgentIdentity, agents: int, jobs: int) -> Any:
        """``agents`` protocol-only agents (own UDP socket and session each) started at
        once, until ``jobs`` results are committed."""
        fleet = [
            flows.VcompFlow(f"agent{i}", functools.partial(self._agent, identity))
            for i in range(agents)
        ]
        return await flows.fleet(fleet, jobs, RUN_TIMEOUT)

    async def _vcomp(self, identity: common.AgentIdentity, nbytes: int) -> float:
        marks: dict[str, Any] = {}
        finished = asyncio.Event()

        def on_event(e: ev.Event) -> None:
            if isinstance(e, ev.Connected):
                marks.setdefault("connected", time.monotonic())
            elif isinstance(e, ev.JobReceived) and "received" not in marks:
                marks.update(received=time.monotonic(), size=len(e.code) + len(e.input))
                finished.set()
            elif isinstance(e, ev.Rejected | ev.SessionClosed) and not finished.is_set():
                marks["failed"] = repr(e)
                finished.set()

        agent = self._agent(identity, on_event)
        await agent.start()
        try:
            await asyncio.wait_for(finished.wait(), RUN_TIMEOUT)
        finally:
            await agent.stop()
        if "failed" in marks:
            raise RuntimeError(f"agent got no job: {marks['failed']}")
        if marks["size"] != nbytes:
            raise RuntimeError(f"agent received {marks['size']} bytes, expected {nbytes}")
        return float(marks["received"] - marks["connected"])

    async def _tcp(self, host: str, port: int, nbytes: int) -> float:
        reader, writer = await asyncio.open_connection(host, port, limit=TCP_READ)
        begin = time.monotonic()
        writer.write(b"g")
        received = 0
        while received < nbytes:
            chunk = await reader.read(TCP_READ)
            if not chunk:
                raise RuntimeError(f"TCP stream ended after {received} of {nbytes} bytes")
            received += len(chunk)
        done = time.monotonic()
        writer.close()
        return done - begin


def agent_side_main(ns: str, conn: Connection) -> None:
    enter(ns)
    common.serve_commands(conn, _AgentSide().handle)


# ---------------------------------------------------------------------- measuring


async def measure_profile(
    name: str,
    impairment: str,
    server: common.Worker,
    agent: common.Worker,
    *,
    size: int,
    stop_and_wait_size: int,
    runs: int,
) -> list[Row]:
    rows = []
    for window, n in ((1, stop_and_wait_size), (DEFAULT_WINDOW, size)):
        blob = os.urandom(n)
        row = Row(name, impairment, "vcomp", window, n)
        identity = await server.ask(("vcomp_start", window, blob, runs + 2))
        try:
            for _ in range(runs):
                row.seconds.append(await agent.ask(("vcomp", identity, n + 2)))
        finally:
            await server.ask(("stop",))
        rows.append(row)
    # TCP moves the same bytes as the default-window job: code || input.
    payload = os.urandom(size) + b"{}"
    tcp = Row(name, impairment, "tcp", None, size)
    port = await server.ask(("tcp_start", payload))
    try:
        for _ in range(runs):
            tcp.seconds.append(await agent.ask(("tcp", A_ADDR, port, len(payload))))
    finally:
        await server.ask(("stop",))
    rows.append(tcp)
    for r in rows:
        r.ratio_tcp = r.mb_s / tcp.mb_s
    return rows


async def measure_on(pair: NetnsPair, profile: Profile, impairment: str, **sizes: int) -> list[Row]:
    server = common.Worker(functools.partial(server_side_main, pair.ns["a"]))
    agent = common.Worker(functools.partial(agent_side_main, pair.ns["b"]))
    try:
        rows = await measure_profile(profile.name, impairment, server, agent, **sizes)
    finally:
        await common.close_all([server, agent])
    if profile.link_bytes_s:
        for r in rows:
            r.link_use = r.size / r.median_seconds / profile.link_bytes_s
    return rows


def measure(profile: Profile, *, netem: bool, **sizes: int) -> list[Row]:
    """One profile in namespaces of its own: netem on a veth pair, else the delay line."""
    if profile.flow_seconds and profile.link_bytes_s and not sizes.pop("quick", 0):
        sizes["size"] = int(profile.flow_seconds * profile.link_bytes_s) // MIB * MIB
    sizes.pop("quick", None)
    if netem and profile.netem is not None:
        with NetnsPair() as pair:
            for side in "ab":
                pair.netem(side, profile.netem)
            return asyncio.run(measure_on(pair, profile, "netem", **sizes))
    with Bottleneck(profile.path) as path:
        return asyncio.run(measure_on(path, profile, "delay line", **sizes))


def run(*, quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Measure and return the figures; ``skipped`` says why when the machine cannot."""
    size = 1 * MIB if quick else 4 * MIB
    stop_and_wait_size = 64 * KIB if quick else 256 * KIB
    runs = runs or (1 if quick else 3)
    figures: dict[str, Any] = {
        "bench": "impaired",
        "runs": runs,
        "chunk": limits.DEFAULT_CHUNK,
        "size": size,
        "stop_and_wait_size": stop_and_wait_size,
        "profiles": [
            {"name": p.name, "netem": " ".join(p.netem or []), "path": dataclasses.asdict(p.path)}
            for p in PROFILES
        ],
        "rows": [],
        "skipped": None,
        "netem": None,
    }
    support = probe()
    if not support.usable:
        figures["skipped"] = f"network namespaces unavailable: {support.reason}"
        return figures
    figures["netem"] = support.netem or support.netem_reason
    rows: list[Row] = []
    for profile in PROFILES:
        rows += measure(
            profile,
            netem=support.netem,
            size=size,
            stop_and_wait_size=stop_and_wait_size,
            runs=runs,
            quick=int(quick),
        )
    figures["rows"] = [r.figures() for r in rows]
    figures["small_jobs"] = measure_small_jobs(SMALL_JOBS // 4 if quick else SMALL_JOBS)
    figures["competing"] = measure_competing(quick=quick)
    return figures


async def _small_jobs_on(path: NetnsPair, jobs: int) -> tuple[list[float], float]:
    server = common.Worker(functools.partial(server_side_main, path.ns["a"]))
    agent = common.Worker(functools.partial(agent_side_main, path.ns["b"]))
    try:
        blob = os.urandom(SMALL_JOB_BYTES)
        identity = await server.ask(("vcomp_start", DEFAULT_WINDOW, blob, jobs + 2))
        try:
            gaps, pto = await agent.ask(("small_jobs", identity, jobs))
        finally:
            await server.ask(("stop",))
    finally:
        await common.close_all([server, agent])
    return gaps, pto


def measure_small_jobs(jobs: int) -> dict[str, Any]:
    """Issue 10 test (d) as a row: each job's exchange in RTTs, median and p95."""
    spec = SMALL_JOBS_PATH
    with Bottleneck(spec) as path:
        gaps, pto = asyncio.run(_small_jobs_on(path, jobs))
    rtt = spec.rtt_ms / 1000
    median = common.median(gaps)
    return {
        "path": dataclasses.asdict(spec),
        "jobs": jobs,
        "job_bytes": SMALL_JOB_BYTES,
        "median_s": median,
        "p95_s": common.percentile(gaps, 95),
        "max_s": max(gaps),
        "median_rtts": median / rtt,
        "p95_rtts": common.percentile(gaps, 95) / rtt,
        "pto_s": pto,
        "median_target_rtts": 4.0,
        "p95_target_rtts": 4.0 + pto / rtt,
    }


# ---------------------------------------------------------------------- competing flows

COMPETING_PATH = PathSpec(rate="20mbit", rtt_ms=40.0, queue_bytes=100_000)
LINK_BYTES_S = 20e6 / 8
FLOW_GAP = 5.0  # issue 10 (b): the second flow starts 5 s after the first
SETTLE = 2.0  # after the later flow starts (handshake, slow start), before the window opens
WINDOW = 20.0  # shares over the last 20 s of the overlap
JAIN_TARGET = 0.9
TCP_RATIO_BOUNDS = (0.5, 2.0)  # vcomp's share against TCP's
MANY_AGENTS = 200
MANY_AGENTS_JOB = 256 * KIB  # 200 of them: 52 MB, about 21 s of the link
MANY_AGENTS_TARGET = 0.70


def competing_bytes(window: float) -> int:
    """More than the link carries in the whole run: no flow can end inside the window."""
    return int(LINK_BYTES_S * (FLOW_GAP + SETTLE + window) * 1.2)


def _workers(path: NetnsPair) -> tuple[common.Worker, common.Worker]:
    server = common.Worker(functools.partial(server_side_main, path.ns["a"]))
    agent = common.Worker(functools.partial(agent_side_main, path.ns["b"]))
    return server, agent


async def _compete_on(
    path: NetnsPair, *, tcp: str | None, window: float
) -> tuple[flows.Samples, int]:
    """Two flows, the second FLOW_GAP s after the first: two vcomp flows (``tcp`` None),
    or vcomp and TCP (``tcp``: "first" or "second", when the TCP flow starts). Returns
    the samples and the packets the vcomp server sent again."""
    size = competing_bytes(window)
    server, agent = _workers(path)
    try:
        blob = os.urandom(size)
        identity = await server.ask(("vcomp_start", DEFAULT_WINDOW, blob, 2))
        try:
            specs: list[tuple[Any, ...]]
            if tcp is None:
                specs = [("vcomp", identity, 0.0), ("vcomp", identity, FLOW_GAP)]
            else:
                port = await server.ask(("tcp_start", blob))
                tcp_at = 0.0 if tcp == "first" else FLOW_GAP
                specs = [
                    ("vcomp", identity, FLOW_GAP - tcp_at),
                    ("tcp", A_ADDR, port, size, tcp_at),
                ]
            seconds = FLOW_GAP + SETTLE + window
            samples: flows.Samples = await agent.ask(("compete", specs, seconds))
            retransmissions = (await server.ask(("batch",)))["retransmissions"]
        finally:
            await server.ask(("stop",))
    finally:
        await common.close_all([server, agent])
    return samples, retransmissions


def _queue_delta(path: Bottleneck, before: dict[str, dict[str, int]]) -> dict[str, int]:
    """What m's queue towards the agents did since ``before``."""
    after = path.queue_counts()["b"]
    return {k: after[k] - before["b"][k] for k in after}


def _shares(samples: flows.Samples, window: float) -> dict[str, Any]:
    shares = flows.window_bytes(samples, window)
    seconds = flows.window_seconds(samples, window)
    intervals = flows.interval_jain(samples, window)
    return {
        "flows": samples.names,
        "window_s": seconds,
        "bytes": shares,
        "mbit_s": [b * 8 / seconds / 1e6 for b in shares],
        "link_use": sum(shares) / seconds / LINK_BYTES_S,
        "jain": flows.jain_index(shares),
        "interval_jain_median": common.median(intervals),
        "interval_jain_min": min(intervals, default=float("nan")),
        "samples": dataclasses.asdict(samples),
    }


def measure_fairness(path: Bottleneck, *, window: float = WINDOW) -> dict[str, Any]:
    """Issue 10 test (b): two vcomp flows FLOW_GAP s apart, Jain's index over the last
    ``window`` s (from the bytes each agent took in, sampled together)."""
    before = path.queue_counts()
    samples, retransmissions = asyncio.run(_compete_on(path, tcp=None, window=window))
    out = _shares(samples, window)
    out.update(
        queue=_queue_delta(path, before), vcomp_retransmissions=retransmissions, target=JAIN_TARGET
    )
    return out


def measure_tcp_friendliness(
    path: Bottleneck, *, tcp: str = "first", window: float = WINDOW
) -> dict[str, Any]:
    """Issue 10 test (c): one vcomp flow against one Linux CUBIC flow, the one named by
    ``tcp`` ("first" or "second") starting first; vcomp's bytes / TCP's over the window."""
    before = path.queue_counts()
    tcp_before = tcp_counters(path, "a")
    samples, retransmissions = asyncio.run(_compete_on(path, tcp=tcp, window=window))
    out = _shares(samples, window)
    vcomp_bytes, tcp_bytes = out["bytes"]
    tcp_after = tcp_counters(path, "a")
    out.update(
        tcp=tcp,
        tcp_sender={k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after},
        vcomp_retransmissions=retransmissions,
        ratio=vcomp_bytes / tcp_bytes if tcp_bytes else float("inf"),
        queue=_queue_delta(path, before),
        offloads=path.offloads,
        bounds=TCP_RATIO_BOUNDS,
    )
    return out


async def _many_agents_on(path: NetnsPair, agents: int, job_bytes: int) -> Any:
    server, agent = _workers(path)
    try:
        blob = os.urandom(job_bytes - 2)  # the input, b"{}", makes up the rest
        identity = await server.ask(("vcomp_start", DEFAULT_WINDOW, blob, agents, agents))
        try:
            run: flows.FleetRun = await agent.ask(("fleet", identity, agents, agents))
            batch = await server.ask(("batch",))
        finally:
            await server.ask(("stop",))
    finally:
        await common.close_all([server, agent])
    return run, batch


def measure_many_agents(
    path: Bottleneck, *, agents: int = MANY_AGENTS, job_bytes: int = MANY_AGENTS_JOB
) -> dict[str, Any]:
    """Issue 10 test (e): ``agents`` protocol-only agents (one process, one UDP socket
    and session each) start at once against one server, one job of ``job_bytes`` each.
    Goodput: all job bytes over the time from the start to the last job received.
    Each agent's UDP flow leaves with a source address of its own (``many_hosts``),
    as from 200 machines: the server limits half-open handshakes per address."""
    path.many_hosts(agents)
    before = path.queue_counts()
    run, batch = asyncio.run(_many_agents_on(path, agents, job_bytes))
    queue = _queue_delta(path, before)
    last = run.received_at[-1] if run.received_at else float("nan")
    seconds = last - run.begin
    # The bulk: until 90% of the job bytes were in (the last jobs' tail shows apart).
    totals = [row[0] for row in run.samples.delivered]
    bulk = next(
        (t for t, d in zip(run.samples.times, totals, strict=True) if d >= 0.9 * run.job_bytes),
        float("nan"),
    )
    return {
        "agents": agents,
        "jobs": agents,
        "job_bytes": job_bytes,
        "received": len(run.received_at),
        "committed": run.committed,
        "failed": run.failed,
        "store": batch,
        "seconds": seconds,
        "first_job_s": run.received_at[0] - run.begin if run.received_at else float("nan"),
        "connected_s": sorted(t - run.begin for t in run.connected_at if t is not None),
        "received_s": [t - run.begin for t in run.received_at],
        "goodput_bytes_s": run.job_bytes / seconds,
        "link_use": run.job_bytes / seconds / LINK_BYTES_S,
        "bulk_link_use": 0.9 * run.job_bytes / (bulk - run.begin) / LINK_BYTES_S,
        "delivered_bytes": run.job_bytes,
        "queue": queue,
        # What the link carried that was the jobs themselves (headers, handshakes,
        # ACKs and retransmissions are the rest): low when the link carries waste.
        "useful_share": run.job_bytes / queue["bytes"] if queue["bytes"] else float("nan"),
        "target": MANY_AGENTS_TARGET,
        "samples": dataclasses.asdict(run.samples),
        "timeline": [_relative(row, run.begin) for row in run.timeline],
    }


def _relative(row: flows.AgentTimeline, begin: float) -> dict[str, Any]:
    """One agent's timeline in seconds from the fleet's start."""
    out = dataclasses.asdict(row)
    for key in ("connected", "first_byte", "received"):
        if out[key] is not None:
            out[key] -= begin
    return out


def print_timeline(many: dict[str, Any], *, slowest: int = 10) -> None:
    """The agents whose jobs ended last, and how the fleet's handshakes went."""
    rows = many["timeline"]

    def end(row: dict[str, Any]) -> float:
        return row["received"] if row["received"] is not None else float("inf")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    connected = sorted(r["connected"] for r in rows if r["connected"] is not None)
    retries = sorted(r["handshake_retries"] for r in rows)
    print(
        f"  {many['agents']} agents: connected at median {common.median(connected):.1f} s, "
        f"last {connected[-1]:.1f} s; handshake retries: {sum(retries)} in all, "
        f"{sum(1 for r in retries if r)} agents retried, most {retries[-1]}"
    )
    print("  slowest agents (s from start): connected, first byte, job in, handshake retries")
    for r in sorted(rows, key=end)[-slowest:]:
        print(
            f"    {r['name']:>9} {fmt(r['connected']):>6} {fmt(r['first_byte']):>6} "
            f"{fmt(r['received']):>6} {r['handshake_retries']:>3}"
        )


def measure_many_agents_repeatedly(runs: int, agents: int = MANY_AGENTS) -> dict[str, Any]:
    """Test (e) ``runs`` times, each on a fresh path: link use to the last job per run."""
    results = []
    for i in range(runs):
        with Bottleneck(COMPETING_PATH) as path:
            many = measure_many_agents(path, agents=agents)
        results.append(many)
        print(
            f"run {i + 1}/{runs}: link use {many['link_use']:.0%} to the last job at "
            f"{many['seconds']:.1f} s (first 90% at {many['bulk_link_use']:.0%}), "
            f"{many['store']['done']}/{agents} done, queue dropped {many['queue']['dropped']}, "
            f"useful share {many['useful_share']:.2f}",
            flush=True,
        )
        print_timeline(many)
    uses = sorted(m["link_use"] for m in results)
    print(
        f"(e) link use over {runs} runs: median {common.median(uses):.0%}, "
        f"range {uses[0]:.0%}-{uses[-1]:.0%}; target >= {MANY_AGENTS_TARGET:.0%}"
    )
    return {"runs": results, "link_use": uses}


def measure_competing(*, quick: bool = False) -> dict[str, Any]:
    """Tests (b), (c) both ways round and (e) as bench rows, each on a fresh path."""
    window = WINDOW / 2 if quick else WINDOW
    out: dict[str, Any] = {"path": dataclasses.asdict(COMPETING_PATH)}
    with Bottleneck(COMPETING_PATH) as path:
        out["fairness"] = measure_fairness(path, window=window)
    for tcp in ("first", "second"):
        with Bottleneck(COMPETING_PATH) as path:
            out[f"tcp_{tcp}"] = measure_tcp_friendliness(path, tcp=tcp, window=window)
    if shutil.which("nft") is None:
        out["many_agents"] = {"skipped": "nft not installed (package nftables)"}
        return out
    with Bottleneck(COMPETING_PATH) as path:
        agents = MANY_AGENTS // 4 if quick else MANY_AGENTS
        out["many_agents"] = measure_many_agents(path, agents=agents)
    return out


# ---------------------------------------------------------------------- reporting


def competing_table(competing: dict[str, Any]) -> list[list[object]]:
    """Issue 10 tests (b), (c) and (e) as rows: what, flows' Mbit/s, link use, figure,
    target, verdict."""
    rows: list[list[object]] = []
    fair = competing["fairness"]
    rates = " / ".join(f"{r:.1f}" for r in fair["mbit_s"])
    rows.append(
        ["(b) 2 vcomp, 5 s apart", rates, f"{fair['link_use']:.0%}", "Jain",
         fair["jain"], f">= {fair['target']}", common.verdict(fair["jain"], fair["target"])]
    )  # fmt: skip
    for tcp in ("first", "second"):
        f = competing[f"tcp_{tcp}"]
        rates = " / ".join(f"{r:.1f}" for r in f["mbit_s"])
        low, high = f["bounds"]
        ok = "met" if low <= f["ratio"] <= high else "MISSED"
        rows.append(
            [f"(c) vcomp + TCP cubic, TCP {tcp}", rates, f"{f['link_use']:.0%}",
             "vcomp:TCP", f["ratio"], f"{low}-{high}x", ok]
        )  # fmt: skip
    many = competing["many_agents"]
    if "skipped" in many:
        rows.append(["(e) 200 agents at once", "-", "-", "goodput", "-", "-", many["skipped"]])
    else:
        done = many["store"]["done"]
        rows.append(
            [f"(e) {many['agents']} agents at once ({done} jobs done)",
             f"{many['goodput_bytes_s'] * 8 / 1e6:.1f} total",
             f"{many['link_use']:.0%}", "goodput/link", many["link_use"],
             f">= {many['target']}", common.verdict(many["link_use"], many["target"])]
        )  # fmt: skip
    return rows


def print_report(figures: dict[str, Any]) -> None:
    columns = [
        "profile",
        "by",
        "transport",
        "window",
        "KiB",
        "seconds",
        "MB/s",
        "vs TCP",
        "link use",
    ]
    table = [
        [
            r["profile"],
            r["impairment"],
            r["transport"],
            r["window"] if r["window"] is not None else "-",
            r["size"] // KIB,
            r["median_seconds"],
            r["mb_s"],
            f"{r['ratio_tcp']:.2f}x",
            "-" if r.get("link_use") is None else f"{r['link_use']:.0%}",
        ]
        for r in figures["rows"]
    ]
    profiles = "; ".join(f"{p['name']} = {p['netem']}" for p in figures["profiles"] if p["netem"])
    netem = figures.get("netem")
    how = "netem" if netem is True else f"the delay line (tc netem unavailable: {netem})"
    notes = [
        f"impairment on both directions by {how}: {profiles}",
        "the 20 Mbit/s profile: delay line (RTT) + tbf (rate, 100 kB queue) in a router namespace",
        f"MB = 10^6 bytes; {figures['chunk']}-byte CODE payloads; median of {figures['runs']}; "
        "vcomp: Connected -> JobReceived, TCP: 'go' byte -> last byte.",
        f"window 1 moves {figures['stop_and_wait_size'] // KIB} KiB (stop-and-wait is slow "
        "at these RTTs); the other rows move the full blob.",
    ]
    if figures["skipped"]:
        notes.insert(0, f"SKIPPED: {figures['skipped']}")
    small = figures.get("small_jobs")
    if small:
        notes.append(
            f"small jobs ({small['jobs']} x {small['job_bytes']} B, 40 ms RTT, 1% loss each "
            f"way, commit to commit): median {small['median_rtts']:.2f} RTT (target <= 4 + "
            f"compute), p95 {small['p95_rtts']:.2f} RTT (target <= 4 + one PTO = "
            f"{small['p95_target_rtts']:.2f}), max {small['max_s'] * 1000:.0f} ms, "
            f"PTO {small['pto_s'] * 1000:.0f} ms"
        )
    common.print_table(
        "Transfer over a real impaired link (veth between two network namespaces), server -> agent",
        columns,
        table,
        notes,
    )
    competing = figures.get("competing")
    if competing:
        print_competing(competing)


def print_competing(competing: dict[str, Any]) -> None:
    many = competing["many_agents"]
    notes = [
        f"flows sampled every {flows.SAMPLE_INTERVAL} s on the receiving side (application "
        f"bytes: job bytes taken in order, TCP bytes read); shares over the last "
        f"{competing['fairness']['window_s']:.0f} s of the overlap; GRO/GSO/TSO "
        f"{competing['tcp_first']['offloads']} on the path's veths",
    ]
    if "skipped" not in many:
        c = many["connected_s"]
        notes.append(
            f"(e): {many['agents']} protocol-only agents in one process, one UDP socket, "
            f"session and source address each; {many['job_bytes'] // KIB} KiB jobs; all "
            f"connected within {c[-1]:.1f} s; last job at {many['seconds']:.1f} s; the first "
            f"90% of the bytes at {many['bulk_link_use']:.0%} of the link; "
            f"job bytes / link bytes {many['useful_share']:.2f}; queue dropped "
            f"{many['queue']['dropped']} of {many['queue']['packets'] + many['queue']['dropped']}"
        )
    common.print_table(
        "Competing flows on 20 Mbit/s, 40 ms RTT, 1-BDP queue (issue 10 tests b, c, e)",
        ["test", "flows Mbit/s", "link use", "figure", "value", "target", "verdict"],
        competing_table(competing),
        notes,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.bench_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, help="repetitions per row (default 3, quick 1)")
    parser.add_argument(
        "--many", type=int, metavar="RUNS", help="only test (e), RUNS times, with timelines"
    )
    args = parser.parse_args(argv)
    if args.many:
        many = measure_many_agents_repeatedly(args.many)
        if args.json:
            common.write_json(args.json, many)
        return many
    figures = run(quick=args.quick, runs=args.runs)
    print_report(figures)
    if args.json:
        common.write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
