"""Transfer against its peers: server -> receiver over loopback, vcomp against TCP, TLS and QUIC.

    python bench/bench_peers.py [--quick] [--json PATH] [--reps N]

Every row moves the same blob from the sending process (this one) to a receiving
process (a spawned worker). Each repetition runs every row once, in a rotated order
(round-robin), so load that comes and goes on a shared machine hits all rows alike:

- vcomp window 1 (the paper's stop-and-wait) and vcomp at the server's default window:
  a fresh real :class:`OrganisationServer` with the blob registered as an app, and one
  :class:`LiteAgent` (the real protocol over real UDP, no sandbox). Time = the server
  issuing START .. the agent's JobReceived (every CODE packet in, size and SHA-256
  checked at END); the handshake comes before and is not timed. The blob is streamed
  out of the SQLite store, as in production. The default window is measured twice: with
  UDP GSO/GRO as detected (the default) and with ``VCOMP_UDP_OFFLOAD=off`` on both sides.
- plain TCP with asyncio streams; TLS 1.3 over TCP (asyncio + ssl, a self-signed
  ECDSA P-256 certificate made at run time); one QUIC stream with aioquic (same kind of
  certificate). A fresh connection per repetition, an untimed 1 MiB warm-up fetch (out
  of slow start), then the blob: time = the receiver's request .. the last byte in.

Both processes run uvloop. MB/s is 10^6 bytes per second of the median time over
``--reps`` repetitions (5; quick 3). Window 1 carries one datagram per round trip, so at
16 MiB it gets 3 repetitions (quick: 1). Then a window sweep (1, 4, 16, 64, 256; vcomp
only; 16 MiB, quick 4 MiB) for the throughput-against-window plot. "CPU ms/MiB" is
both processes' CPU per MiB moved (connection setup, handshake and warm-up included).

Goals (issue 5): vcomp default window >= 3x aioquic and >= 40% of TLS-over-TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    AgentIdentity,
    Worker,
    bench_parser,
    bench_server,
    install_uvloop,
    median,
    open_agent_tpm,
    print_table,
    process_cpu_seconds,
    serve_commands,
    udp_counters,
    udp_drops,
    write_json,
)
from tests.tlscert import SelfSigned, self_signed

from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.server.config import DEFAULT_CONFIG
from vcomp.udp_offload import OFFLOAD_ENV, probe_loopback

MIB = 1 << 20
ALPN = "vcomp-bench"
REQUEST_LEN = 8  # TCP/QUIC rows: the receiver asks for n bytes with an 8-byte length
WARMUP_BYTES = 1 << 20  # an untimed fetch first, so TCP and QUIC leave slow start
DEFAULT_WINDOW = int(tomllib.loads(DEFAULT_CONFIG)["server"]["window"])
SWEEP_WINDOWS = (1, 4, 16, 64, 256)
TRANSFER_TIMEOUT = 300.0
GOAL_VS_QUIC = 3.0
GOAL_VS_TLS = 0.40
STOP_AND_WAIT = "vcomp window 1 (stop-and-wait)"
OFFLOAD_OFF = f"vcomp window {DEFAULT_WINDOW}, udp offload off"
TCP = "TCP (asyncio streams)"
TLS = "TLS 1.3 over TCP"
QUIC = "QUIC stream (aioquic)"

try:
    import aioquic  # noqa: F401

    QUIC_MISSING = ""
except ImportError:  # pragma: no cover - the bench extra installs it
    QUIC_MISSING = "aioquic is not installed (pip install -e '.[bench]')"


# ---------------------------------------------------------------------- senders (this process)


@contextlib.asynccontextmanager
async def tcp_sender(blob: bytes, tls: ssl.SSLContext | None) -> AsyncIterator[int]:
    """Answer each 8-byte request (a length n) with the first n bytes of ``blob``."""
    view = memoryview(blob)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(REQUEST_LEN), "big")
                writer.write(view[:n])
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def tls_server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


@contextlib.asynccontextmanager
async def quic_sender(blob: bytes, cert_path: Path, key_path: Path) -> AsyncIterator[int]:
    """An aioquic server answering each request stream (a length n) with n bytes and FIN."""
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent, StreamDataReceived

    class BlobServer(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                n = int.from_bytes(event.data[:REQUEST_LEN], "big")
                self._quic.send_stream_data(event.stream_id, blob[:n], end_stream=True)
                self.transmit()

    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.load_cert_chain(cert_path, key_path)
    server = await serve("127.0.0.1", 0, configuration=config, create_protocol=BlobServer)
    try:
        transport = server._transport
        assert transport is not None
        yield int(transport.get_extra_info("sockname")[1])
    finally:
        server.close()


# ---------------------------------------------------------------------- receiver (worker)


async def receive_tcp(port: int, sizes: list[int], ca_pem: str | None) -> list[float]:
    """One connection; fetch each size in turn, timing request -> last byte."""
    tls: ssl.SSLContext | None = None
    if ca_pem is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.minimum_version = ssl.TLSVersion.TLSv1_3
        tls.load_verify_locations(cadata=ca_pem)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None, limit=1 << 22
    )
    times = []
    try:
        for size in sizes:
            t0 = time.monotonic()
            writer.write(size.to_bytes(REQUEST_LEN, "big"))
            await writer.drain()
            got = 0
            while got < size:
                chunk = await reader.read(min(1 << 20, size - got))
                if not chunk:
                    raise ConnectionError("sender closed early")
                got += len(chunk)
            times.append(time.monotonic() - t0)
    finally:
        writer.close()
    return times


async def receive_quic(port: int, sizes: list[int], ca_pem: str) -> list[float]:
    """One QUIC connection; fetch each size on a new stream, timing request -> FIN."""
    from aioquic.asyncio.client import connect
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent, StreamDataReceived

    class BlobClient(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.got = 0
            self.done: asyncio.Future[int] | None = None

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived):
                self.got += len(event.data)
                if event.end_stream and self.done is not None and not self.done.done():
                    self.done.set_result(self.got)

        async def fetch(self, size: int) -> int:
            self.got = 0
            self.done = asyncio.get_running_loop().create_future()
            stream = self._quic.get_next_available_stream_id()
            self._quic.send_stream_data(stream, size.to_bytes(REQUEST_LEN, "big"), end_stream=True)
            self.transmit()
            return await self.done

    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    config.load_verify_locations(cadata=ca_pem.encode())
    times = []
    async with connect("127.0.0.1", port, configuration=config, create_protocol=BlobClient) as c:
        client: BlobClient = c  # type: ignore[assignment]
        for size in sizes:
            t0 = time.monotonic()
            got = await client.fetch(size)
            times.append(time.monotonic() - t0)
            if got != size:
                raise ConnectionError(f"QUIC stream carried {got} bytes, not {size}")
    return times


_prepared: dict[str, Any] = {}


def prepare_vcomp(identity: AgentIdentity) -> bool:
    """The agent's own setup, kept out of the measured CPU: power on the TPM (its measured
    launch hashes the installed source) and make the ephemeral RSA key."""
    _prepared.update(
        identity=identity, tpm=open_agent_tpm(identity.tpm_dir), key=hs.generate_ephemeral()
    )
    return True


@contextlib.contextmanager
def udp_offload(on: bool) -> Iterator[None]:
    """VCOMP_UDP_OFFLOAD for the sockets opened inside (GSO/GRO on, or off to compare)."""
    before = os.environ.get(OFFLOAD_ENV)
    os.environ[OFFLOAD_ENV] = "on" if on else "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[OFFLOAD_ENV]
        else:
            os.environ[OFFLOAD_ENV] = before


async def receive_vcomp(count: int, offload: bool = True) -> list[tuple[int, int, float, int]]:
    """Join with one LiteAgent; note (job, attempt, monotonic time, bytes) per JobReceived."""
    identity: AgentIdentity = _prepared["identity"]
    received: list[tuple[int, int, float, int]] = []
    enough = asyncio.Event()
    failure: list[str] = []

    def tap(e: ev.Event) -> None:
        if isinstance(e, ev.Rejected | ev.SessionClosed) and not enough.is_set():
            # Fail fast (e.g. the source changed between the server's golden measurement
            # and the agent's measured launch) instead of waiting for the timeout.
            failure.append(f"{type(e).__name__}: {getattr(e, 'reason', '')}")
            enough.set()
        elif isinstance(e, ev.JobReceived):
            d = e.description
            received.append((d.job, d.attempt, time.monotonic(), len(e.code) + len(e.input)))
            if len(received) >= count:
                enough.set()

    agent = LiteAgent(
        tpm=_prepared["tpm"],
        pinned=identity.pinned,
        server=identity.server,
        ephemeral=_prepared["key"],
        on_event=tap,
    )
    with udp_offload(offload):
        await agent.start()
    try:
        await asyncio.wait_for(enough.wait(), TRANSFER_TIMEOUT)
    finally:
        await agent.stop()
    if failure:
        raise RuntimeError(f"the agent got {len(received)} of {count} jobs: {failure[0]}")
    return received


async def handle(command: tuple[Any, ...]) -> Any:
    kind, *args = command
    if kind == "tcp":
        return await receive_tcp(*args)
    if kind == "quic":
        return await receive_quic(*args)
    if kind == "vcomp_prepare":
        return prepare_vcomp(*args)
    if kind == "vcomp":
        return await receive_vcomp(*args)
    raise ValueError(f"unknown command {kind!r}")


def receiver(conn: Connection) -> None:
    serve_commands(conn, handle)


# ---------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    size: int
    times: list[float] = field(default_factory=list)
    note: str = ""
    skipped: str = ""
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """CPU seconds (sender, receiver) over every measurement, setup and warm-up included."""
    moved: int = 0
    """Bytes moved for those CPU seconds (warm-up fetches included)."""

    @property
    def median_s(self) -> float:
        return median(self.times)

    @property
    def cpu_ms_per_mib(self) -> float:
        return sum(self.cpu) * 1000 / (self.moved / MIB) if self.moved else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.size / self.median_s / 1e6 if self.times else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.size,
            "times_s": self.times,
            "median_s": self.median_s if self.times else None,
            "mb_per_s": self.mb_per_s if self.times else None,
            "note": self.note,
            "skipped": self.skipped,
            "sender_cpu_s": self.cpu[0],
            "receiver_cpu_s": self.cpu[1],
            "cpu_ms_per_mib": self.cpu_ms_per_mib,
        }


@dataclass(frozen=True)
class Measured:
    seconds: float
    cpu: tuple[float, float]  # sender, receiver
    moved: int
    drops: int = 0


async def measured_ask(
    worker: Worker, command: tuple[Any, ...], timeout: float
) -> tuple[Any, tuple[float, float]]:
    """The worker's reply, and the CPU seconds (sender, receiver) both processes spent on it."""
    sender0, receiver0 = time.process_time(), process_cpu_seconds(worker.pid)
    reply = await worker.ask(command, timeout)
    return reply, (time.process_time() - sender0, process_cpu_seconds(worker.pid) - receiver0)


async def vcomp_once(worker: Worker, blob: bytes, window: int, offload: bool = True) -> Measured:
    """A fresh server and session; one job whose code is ``blob``; START -> JobReceived."""
    with udp_offload(offload):  # read when the server's socket opens
        async with bench_server(window=window) as bench:
            with tempfile.NamedTemporaryFile() as f:
                f.write(blob)
                f.flush()
                bench.server.store.add_app("blob", "exec", f.name)
            bench.server.store.create_batch("blob", [b"0"], cpu_seconds=60, wall_seconds=60)
            await worker.ask(("vcomp_prepare", bench.identities[0]))
            before = udp_counters()
            received, cpu = await measured_ask(worker, ("vcomp", 1, offload), TRANSFER_TIMEOUT + 30)
            drops = udp_drops(before, udp_counters())
            ((job, attempt, at, nbytes),) = received
            if nbytes < len(blob):
                raise RuntimeError("the agent received fewer bytes than the blob")
            return Measured(at - bench.starts[(job, attempt)], cpu, nbytes, drops)


async def stream_once(worker: Worker, blob: bytes, kind: str, cert: SelfSigned | None) -> Measured:
    """A fresh TCP, TLS or QUIC connection: an untimed warm-up fetch, then the blob."""
    sizes = [min(WARMUP_BYTES, len(blob)), len(blob)]
    ca = cert.cert_pem.decode() if cert else None
    with tempfile.TemporaryDirectory() as d:
        if kind == "quic":
            assert cert is not None
            async with quic_sender(blob, *cert.write(Path(d))) as port:
                times, cpu = await measured_ask(worker, ("quic", port, sizes, ca), TRANSFER_TIMEOUT)
        else:
            tls = tls_server_context(*cert.write(Path(d))) if cert else None
            async with tcp_sender(blob, tls) as port:
                times, cpu = await measured_ask(worker, ("tcp", port, sizes, ca), TRANSFER_TIMEOUT)
    return Measured(times[-1], cpu, sum(sizes))


@dataclass(frozen=True)
class Spec:
    name: str
    measure: Callable[[bytes], Awaitable[Measured]]
    reps: int


async def measure_rows(specs: list[Spec], size: int) -> list[Row]:
    """Round-robin: every repetition runs each row once, in a rotated order, so load that
    comes and goes on a shared machine lands on every row alike."""
    blob = bytes(range(256)) * (size // 256)
    rows = {spec.name: Row(spec.name, size) for spec in specs}
    for rep in range(max(spec.reps for spec in specs)):
        shift = rep % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            row = rows[spec.name]
            if rep >= spec.reps or row.skipped:
                continue
            try:
                m = await retry_measurement(spec.measure, blob)
            except Exception as exc:  # one failing row must not sink the others
                row.skipped = f"failed: {exc!r}"[:300]
                continue
            row.times.append(m.seconds)
            row.cpu = [row.cpu[0] + m.cpu[0], row.cpu[1] + m.cpu[1]]
            row.moved += m.moved
            if m.drops:
                row.note = f"UDP drops (host-wide): {m.drops}"
    for row in rows.values():
        if row.skipped and row.times:
            row.skipped, row.note = "", f"{row.skipped} (after {len(row.times)} reps)"
    return list(rows.values())


async def retry_measurement(
    measure: Callable[[bytes], Awaitable[Measured]], blob: bytes
) -> Measured:
    """A measurement rejected for the agent's measurement is tried once more: PCR 17
    measures the installed source, so an edit between the server's golden value and the
    agent's launch (only ever seen while developing) would otherwise lose the row."""
    try:
        return await measure(blob)
    except RuntimeError as exc:
        if "measurement_not_allowed" not in str(exc):
            raise
    return await measure(blob)


async def run(quick: bool, reps: int | None = None) -> dict[str, Any]:
    reps = reps or (3 if quick else 5)
    # Window 1 moves one datagram per round trip; at 16 MiB it is by far the slowest row.
    w1_reps = {1 * MIB: reps, 16 * MIB: 1 if quick else 3}
    sweep_size = 4 * MIB if quick else 16 * MIB
    sweep_reps = 2 if quick else 3
    cert = self_signed()
    worker = Worker(receiver)
    rows: list[Row] = []
    default = f"vcomp window {DEFAULT_WINDOW} (default)"
    try:
        for size in (1 * MIB, 16 * MIB):
            specs = [
                Spec(default, partial(vcomp_once, worker, window=DEFAULT_WINDOW), reps),
                Spec(
                    OFFLOAD_OFF,
                    partial(vcomp_once, worker, window=DEFAULT_WINDOW, offload=False),
                    reps,
                ),
                Spec(STOP_AND_WAIT, partial(vcomp_once, worker, window=1), w1_reps[size]),
                Spec(TCP, partial(stream_once, worker, kind="tcp", cert=None), reps),
                Spec(TLS, partial(stream_once, worker, kind="tcp", cert=cert), reps),
            ]
            if QUIC_MISSING:
                rows.append(Row(QUIC, size, skipped=QUIC_MISSING))
            else:
                specs.append(Spec(QUIC, partial(stream_once, worker, kind="quic", cert=cert), reps))
            rows += await measure_rows(specs, size)
        sweep = await measure_rows(
            [
                Spec(f"vcomp window {w}", partial(vcomp_once, worker, window=w), sweep_reps)
                for w in SWEEP_WINDOWS
            ],
            sweep_size,
        )
    finally:
        await worker.close()
    order = [default, OFFLOAD_OFF, STOP_AND_WAIT, TCP, TLS, QUIC]
    rows.sort(key=lambda r: (r.size, order.index(r.name)))
    with udp_offload(True):
        gso, gro = probe_loopback()
    offload = f"gso {gso.status}, gro {gro.status}"
    return {"rows": rows, "sweep": sweep, "reps": reps, "goals": goals(rows), "offload": offload}


def _find(rows: list[Row], prefix: str, size: int) -> Row | None:
    return next((r for r in rows if r.name.startswith(prefix) and r.size == size and r.times), None)


def goals(rows: list[Row]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for size in sorted({r.size for r in rows}):
        vc = _find(rows, f"vcomp window {DEFAULT_WINDOW} ", size)
        for peer, target, label in (
            ("QUIC", GOAL_VS_QUIC, "aioquic"),
            ("TLS", GOAL_VS_TLS, "TLS 1.3 over TCP"),
        ):
            other = _find(rows, peer, size)
            goal = f"{size // MIB} MiB: vcomp default window >= {target:g}x {label}"
            if vc is None or other is None:
                missing = "vcomp" if vc is None else label
                out.append({"goal": goal, "status": "not run", "reason": f"no {missing} figure"})
                continue
            ratio = vc.mb_per_s / other.mb_per_s
            status = "met" if ratio >= target else "missed"
            out.append({"goal": goal, "status": status, "value": ratio, "target": target})
    return out


def report(result: dict[str, Any]) -> None:
    rows: list[Row] = result["rows"]
    tcp = {r.size: r for r in rows if r.name.startswith("TCP") and r.times}
    table: list[list[object]] = []
    for r in rows:
        if r.skipped:
            table.append([r.name, f"{r.size // MIB} MiB", "-", "-", "-", "-", "-", r.skipped])
            continue
        base = tcp.get(r.size)
        vs_tcp = base.median_s / r.median_s if base else float("nan")
        table.append(
            [
                r.name,
                f"{r.size // MIB} MiB",
                len(r.times),
                r.median_s * 1000,
                r.mb_per_s,
                vs_tcp,
                r.cpu_ms_per_mib,
                r.note,
            ]
        )
    print_table(
        "Transfer server -> receiver over loopback (median of reps)",
        ["row", "size", "reps", "median ms", "MB/s", "x TCP", "CPU ms/MiB", "note"],
        table,
        [
            "CPU ms/MiB: sender + receiver process CPU per MiB moved (connection setup, "
            "handshake and warm-up fetch included). Rows interleaved round-robin.",
            "vcomp time: server START -> agent JobReceived (SHA-256 checked); others: request -> "
            "last byte. MB = 10^6 bytes. Both processes run uvloop.",
            f"UDP offload on this host: {result['offload']}; the 'udp offload off' row sets "
            f"{OFFLOAD_ENV}=off on both sides.",
        ],
    )
    sweep: list[Row] = result["sweep"]
    print_table(
        "vcomp throughput against window size",
        ["window", "size", "reps", "median ms", "MB/s", "note"],
        [
            [
                r.name,
                f"{r.size // MIB} MiB",
                len(r.times),
                r.median_s * 1000,
                r.mb_per_s,
                r.note or r.skipped,
            ]
            for r in sweep
        ],
    )
    print_table(
        "Goals",
        ["goal", "ratio", "status"],
        [[g["goal"], g.get("value", float("nan")), g["status"]] for g in result["goals"]],
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, help="repetitions per row (default 3 quick, 5)")
    args = parser.parse_args(argv)
    install_uvloop()
    result = asyncio.run(run(args.quick, args.reps))
    report(result)
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "peers",
                "quick": args.quick,
                "reps": result["reps"],
                "udp_offload": result["offload"],
                "rows": [r.as_dict() for r in result["rows"]],
                "sweep": [
                    dict(r.as_dict(), window=SWEEP_WINDOWS[i])
                    for i, r in enumerate(result["sweep"])
                ],
                "goals": result["goals"],
            },
        )


if __name__ == "__main__":
    main()
