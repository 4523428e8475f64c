"""Real-UDP transfer on loopback: one job's code, server -> agent, fully encrypted.

    python bench/bench_udp_transfer.py [--quick] [--json PATH] [--runs N]
                                       [--windows 1,64,128,256] [--placement both|same|process]

A real :class:`OrganisationServer` (uvloop, SQLite store) holds a registered app of
16 MiB (``--quick``: 4 MiB) and a batch of one-input jobs; a protocol-only
:class:`~vcomp.loadgen.LiteAgent` joins over UDP on 127.0.0.1 and takes one job. The
code travels as encrypted CODE packets with 1200-byte payloads, read from the store
chunk by chunk. Window 1 is the paper's stop-and-wait; it moves 1 MiB, since a 16 MiB
blob at that rate only costs time (its MB/s is what matters).

"seconds" runs from the moment the server issues START (its clock) to the agent's
JobReceived (the agent's clock: both are CLOCK_MONOTONIC, shared by all processes);
"+handshake" runs from the agent's first HELLO instead. Plain TCP over asyncio streams
moves the same bytes as the reference, in the same run and the same placement.

Placement "same": server and agent share one process and one event loop.
Placement "process": the agent (or TCP client) runs in a spawned process on its own
loop, so each side can have a core, as in a real deployment. "server CPU" is the
server process's CPU time for the transfer (in "same" it includes the agent).
"retx/lost" are the server channel's retransmissions and packets declared lost;
"rcvbuf drops" is the kernel's UDP RcvbufErrors counter over the run (system-wide).
Median of ``--runs`` runs (3; ``--quick``: 1).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import limits

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

MIB = 1 << 20
FULL_BYTES = 16 * MIB
QUICK_BYTES = 4 * MIB
STOP_AND_WAIT_BYTES = 1 * MIB
DEFAULT_WINDOW = 64
WINDOWS = (1, DEFAULT_WINDOW, 128, 256)
TARGET_MB_S = 60.0
RUN_TIMEOUT = 300.0
SETTLE_SECONDS = 0.2  # let the previous session's close and result commit finish
TCP_READ = 256 * 1024


@dataclass
class Sample:
    seconds: float
    with_handshake: float
    server_cpu: float
    agent_cpu: float = float("nan")
    packets_sent: int = 0
    retransmissions: int = 0
    lost: int = 0
    rcvbuf_drops: int = 0


@dataclass
class Row:
    transport: str
    window: int | None
    placement: str
    size: int
    samples: list[Sample] = field(default_factory=list)
    ratio_tcp: float = float("nan")

    def median(self, name: str) -> float:
        return common.median([float(getattr(s, name)) for s in self.samples])

    @property
    def seconds(self) -> float:
        return self.median("seconds")

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(seconds=self.seconds, mb_s=self.mb_s)
        for name in (
            "with_handshake",
            "server_cpu",
            "agent_cpu",
            "retransmissions",
            "lost",
            "rcvbuf_drops",
        ):
            out[name] = self.median(name)
        return out


# ---------------------------------------------------------------------- the agent side
# These run either in the server's own loop ("same") or in a spawned worker ("process").


def _no_work(job: ev.JobReceived) -> bytes:
    return b"received"


async def receive_one_job(
    tpm: SimulatedTpm,
    identity: common.AgentIdentity,
    ephemeral: tuple[rsa.RSAPrivateKey, bytes],
) -> dict[str, Any]:
    """Join, take one job, note when it arrived whole, leave."""
    arrived = asyncio.Event()
    got: dict[str, Any] = {}

    def on_event(e: ev.Event) -> None:
        if isinstance(e, ev.JobReceived) and not got:
            got.update(
                received=time.monotonic(),
                job=(e.description.job, e.description.attempt),
                size=len(e.code) + len(e.input),
            )
            arrived.set()
        elif isinstance(e, ev.Rejected | ev.SessionClosed) and not arrived.is_set():
            got["failed"] = repr(e)
            arrived.set()

    agent = LiteAgent(
        tpm=tpm,
        pinned=identity.pinned,
        server=identity.server,
        ephemeral=ephemeral,
        compute=_no_work,
        on_event=on_event,
    )
    begin = time.monotonic()
    await agent.start()
    try:
        await asyncio.wait_for(arrived.wait(), RUN_TIMEOUT)
    finally:
        await agent.stop()
    if "failed" in got:
        raise RuntimeError(f"agent got no job: {got['failed']}")
    return {"begin": begin, **got}


async def tcp_receive(host: str, port: int, nbytes: int) -> dict[str, Any]:
    begin = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port, limit=TCP_READ)
    received = 0
    while received < nbytes:
        chunk = await reader.read(TCP_READ)
        if not chunk:
            raise RuntimeError(f"TCP stream ended after {received} of {nbytes} bytes")
        received += len(chunk)
    done = time.monotonic()
    writer.close()
    return {"begin": begin, "received": done}


class _AgentProcess:
    """Command handler of the spawned agent process."""

    def __init__(self) -> None:
        self._tpms: dict[str, SimulatedTpm] = {}
        self._ephemeral = common.ephemeral_pool(1)[0]

    async def handle(self, command: tuple[Any, ...]) -> dict[str, Any]:
        cpu0 = time.process_time()
        reply = await self._handle(command)
        return {**reply, "cpu": time.process_time() - cpu0}

    async def _handle(self, command: tuple[Any, ...]) -> dict[str, Any]:
        kind, *args = command
        if kind == "vcomp":
            identity: common.AgentIdentity = args[0]
            tpm = self._tpms.get(identity.tpm_dir)
            if tpm is None:
                tpm = self._tpms[identity.tpm_dir] = common.open_agent_tpm(identity.tpm_dir)
            return await receive_one_job(tpm, identity, self._ephemeral)
        if kind == "tcp":
            return await tcp_receive(*args)
        raise ValueError(f"unknown command {kind!r}")


def agent_process_main(conn: Connection) -> None:
    common.serve_commands(conn, _AgentProcess().handle)


# ---------------------------------------------------------------------- the server side


class _VcompServerRuns:
    """One server at one window: a registered blob and enough queued jobs for every run."""

    def __init__(self, bench: common.BenchServer, size: int) -> None:
        self.bench = bench
        self.size = size
        self.delivered: dict[tuple[int, int], dict[str, float]] = {}
        bench.taps.append(self._on_event)

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.JobDelivered):
            self.delivered[(e.job, e.attempt)] = self.bench.session_stats(e.session_id)

    async def prepare(self, runs: int, blob: bytes) -> None:
        server = self.bench.server
        code = self.bench.home / "blob.bin"
        code.write_bytes(blob)
        await server.committer.run(server.store.add_app, "blob", "python", code)
        # Each run leaves at most one extra lease behind (the job offered to the agent
        # just before it left), hence two jobs per run.
        await server.committer.run(
            lambda: server.store.create_batch("blob", [b"{}"] * (2 * runs + 2), wall_seconds=60)
        )

    async def sample(self, run: Any) -> Sample:
        before_udp = common.udp_counters()
        cpu0 = time.process_time()
        got = await run()
        cpu = time.process_time() - cpu0
        job: tuple[int, int] = (got["job"][0], got["job"][1])
        if got["size"] != self.size + 2:
            raise RuntimeError(f"agent received {got['size']} bytes, expected {self.size + 2}")
        for _ in range(100):  # the last ACKs may still be on their way
            if job in self.delivered:
                break
            await asyncio.sleep(0.01)
        stats = self.delivered.get(job, {})
        start = self.bench.starts[job]
        return Sample(
            seconds=got["received"] - start,
            with_handshake=got["received"] - got["begin"],
            server_cpu=cpu,
            agent_cpu=got.get("cpu", float("nan")),
            packets_sent=int(stats.get("packets_sent", 0)),
            retransmissions=int(stats.get("retransmissions", 0)),
            lost=int(stats.get("packets_lost", 0)),
            rcvbuf_drops=common.udp_drops(before_udp, common.udp_counters()),
        )


async def measure_vcomp(
    window: int,
    size: int,
    runs: int,
    placements: Sequence[str],
    worker: common.Worker | None,
    blob: bytes,
) -> list[Row]:
    rows = [Row("vcomp", window, p, size) for p in placements]
    async with common.bench_server(window, agent_tpms=2) as bench:
        runner = _VcompServerRuns(bench, size)
        await runner.prepare(runs * len(placements), blob)
        same_tpm = common.open_agent_tpm(bench.identities[0].tpm_dir)
        ephemeral = common.ephemeral_pool(1)[0]
        for _ in range(runs):
            for row in rows:
                await asyncio.sleep(SETTLE_SECONDS)
                if row.placement == "same":
                    run = lambda: receive_one_job(same_tpm, bench.identities[0], ephemeral)  # noqa: E731
                else:
                    assert worker is not None
                    run = lambda: worker.ask(("vcomp", bench.identities[1]))  # noqa: E731
                row.samples.append(await runner.sample(run))
    return rows


async def measure_tcp(
    size: int, runs: int, placements: Sequence[str], worker: common.Worker | None, blob: bytes
) -> list[Row]:
    rows = [Row("tcp", None, p, size) for p in placements]
    payload = blob + b"{}"  # the same bytes as the vcomp job: code || input

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(send, common.LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(runs):
            for row in rows:
                await asyncio.sleep(SETTLE_SECONDS)
                cpu0 = time.process_time()
                if row.placement == "same":
                    got = await tcp_receive(common.LOOPBACK, port, len(payload))
                else:
                    assert worker is not None
                    got = await worker.ask(("tcp", common.LOOPBACK, port, len(payload)))
                seconds = got["received"] - got["begin"]
                cpu = time.process_time() - cpu0
                row.samples.append(Sample(seconds, seconds, cpu, got.get("cpu", float("nan"))))
    finally:
        server.close()
        await server.wait_closed()
    return rows


async def measure(
    *, size: int, windows: Sequence[int], runs: int, placements: Sequence[str]
) -> list[Row]:
    worker = common.Worker(agent_process_main) if "process" in placements else None
    blobs: dict[int, bytes] = {}
    rows: list[Row] = []
    try:
        for window in windows:
            n = STOP_AND_WAIT_BYTES if window == 1 else size
            blob = blobs.setdefault(n, os.urandom(n))
            rows += await measure_vcomp(window, n, runs, placements, worker, blob)
        for n, blob in sorted(blobs.items()):
            rows += await measure_tcp(n, runs, placements, worker, blob)
    finally:
        if worker is not None:
            await worker.close()
    tcp = {(r.placement, r.size): r.mb_s for r in rows if r.transport == "tcp"}
    for r in rows:
        r.ratio_tcp = r.mb_s / tcp[(r.placement, r.size)]
    return rows


# ---------------------------------------------------------------------- reporting


def run(
    *,
    quick: bool = False,
    runs: int | None = None,
    windows: Sequence[int] = WINDOWS,
    placements: Sequence[str] = ("same", "process"),
) -> dict[str, Any]:
    """Measure and return the figures (the event loop is created here, on uvloop)."""
    loop_name = common.install_uvloop()
    size = QUICK_BYTES if quick else FULL_BYTES
    runs = runs or (1 if quick else 3)
    rows = asyncio.run(measure(size=size, windows=windows, runs=runs, placements=placements))
    best = [r for r in rows if r.transport == "vcomp" and r.window == DEFAULT_WINDOW]
    best_mb_s = max((r.mb_s for r in best), default=float("nan"))
    return {
        "bench": "udp_transfer",
        "loop": loop_name,
        "runs": runs,
        "chunk": limits.DEFAULT_CHUNK,
        "rows": [r.figures() for r in rows],
        "target_mb_s": TARGET_MB_S,
        "default_window_mb_s": best_mb_s,
        "target": common.verdict(best_mb_s, TARGET_MB_S),
    }


def print_report(figures: dict[str, Any]) -> None:
    columns = [
        "transport",
        "window",
        "agent",
        "MiB",
        "seconds",
        "MB/s",
        "vs TCP",
        "+handshake s",
        "server CPU s",
        "agent CPU s",
        "pkts sent",
        "retx",
        "lost",
        "rcvbuf drops",
    ]
    table = [
        [
            r["transport"],
            r["window"] if r["window"] is not None else "-",
            r["placement"],
            r["size"] / MIB,
            r["seconds"],
            r["mb_s"],
            f"{r['ratio_tcp']:.2f}x",
            r["with_handshake"],
            r["server_cpu"],
            r["agent_cpu"],
            int(common.median([s["packets_sent"] for s in r["samples"]])),
            r["retransmissions"],
            r["lost"],
            r["rcvbuf_drops"],
        ]
        for r in figures["rows"]
    ]
    common.print_table(
        f"UDP transfer on loopback, server -> agent, {figures['chunk']}-byte CODE payloads, "
        f"median of {figures['runs']}, server on {figures['loop']}",
        columns,
        table,
        [
            "MB = 10^6 bytes. Window 1 (stop-and-wait) moves 1 MiB; TCP rows move each size.",
            "agent 'same' = one process and loop for both sides; 'process' = agent in its own "
            "spawned process.",
            f"target: window {DEFAULT_WINDOW} >= {TARGET_MB_S:.0f} MB/s -> "
            f"{figures['default_window_mb_s']:.1f} MB/s (best placement): {figures['target']}",
        ],
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.bench_parser(__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, help="repetitions per row (default 3, quick 1)")
    parser.add_argument("--windows", default=",".join(map(str, WINDOWS)))
    parser.add_argument("--placement", choices=("both", "same", "process"), default="both")
    args = parser.parse_args(argv)
    placements = ("same", "process") if args.placement == "both" else (args.placement,)
    figures = run(
        quick=args.quick,
        runs=args.runs,
        windows=[int(w) for w in args.windows.split(",")],
        placements=placements,
    )
    print_report(figures)
    if args.json:
        common.write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
