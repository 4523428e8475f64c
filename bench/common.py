"""Shared helpers for the end-to-end benchmarks (transfer, handshake, dispatch).

- Reporting: :func:`print_table` (the load average goes in every header, since the
  machine is shared), :func:`write_json`, :func:`median`, :func:`percentile`,
  :func:`verdict`, :func:`bench_parser`.
- Measuring: :func:`process_cpu_seconds` (any pid, from ``/proc``) and
  :func:`udp_counters` (the kernel's UDP drop counters).
- Setting up: :func:`bench_server`, an async context manager that builds a temporary
  server home, enrols simulated TPMs (one per agent process: a TPM's clock and reset
  count must only move forwards, so processes cannot share one), allowlists their
  measurement and starts an :class:`OrganisationServer` on ``127.0.0.1:0``. Agent
  processes rebuild their TPM from an :class:`AgentIdentity` with :func:`open_agent_tpm`.
- Agent processes: :class:`Worker` runs a function in a *spawned* process (the server's
  uvloop is not fork-safe) and talks to it over a pipe, one command and one reply
  at a time.

Every bench script has ``main(argv)`` and a ``run(...)`` function returning its figures
as a dict, so a suite can call them without a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp import logfmt
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement, measured_launch
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.server.config import init_server_home, load_server_config
from vcomp.server.service import OrganisationServer

LOOPBACK = "127.0.0.1"
POLICY: dict[str, Any] = {}  # the measured-launch policy of every bench agent
WORKER_TIMEOUT = 600.0

# ---------------------------------------------------------------------- reporting


def install_uvloop() -> str:
    """Use uvloop as production does (``vcomp-server serve``); name the loop in use."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return "asyncio"
    uvloop.install()
    return "uvloop"


LOG_HELP = "format and write the server's production log lines (to /dev/null)"


def server_logging(enabled: bool) -> str:
    """Production logs a line per session and job event; benches skip it unless asked.

    Enabled, the lines are formatted and written to /dev/null, so their cost counts.
    """
    if not enabled:
        logging.getLogger("vcomp").setLevel(logging.WARNING)
        return "off (warnings only)"
    logfmt.setup(stream=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    return "on, INFO lines written to /dev/null"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load avg {one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile, ``p`` in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def verdict(value: float, target: float, *, higher_is_better: bool = True) -> str:
    if math.isnan(value):
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: Sequence[str] = (),
) -> None:
    """A plain-text table; the header carries the load average at print time."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max([len(c)] + [len(r[i]) for r in cells if i < len(r)]) for i, c in enumerate(columns)
    ]
    print(f"\n{title}  [{load_average()}, {os.cpu_count()} cpus]")
    print(
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(columns, widths, strict=True))
        )
    )
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=False))
            )
        )
    for note in notes:
        print(f"  {note}")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    data = {"machine": machine(), **payload}
    Path(path).write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def bench_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a short run (for the suite's QUICK=1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return parser


# ---------------------------------------------------------------------- measuring

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of a whole process (all threads), from ``/proc/PID/stat``."""
    if pid is None:
        return time.process_time()
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is fields[0]; utime and stime are stat fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (``/proc/net/snmp``): RcvbufErrors are drops on full sockets."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = (line for line in lines if line and line[0] == "Udp:")
    return {k: int(v) for k, v in zip(names[1:], values[1:], strict=True)}


def udp_drops(before: dict[str, int], after: dict[str, int]) -> int:
    return after.get("RcvbufErrors", 0) - before.get("RcvbufErrors", 0)


# ---------------------------------------------------------------------- server + agents


@dataclass(frozen=True)
class AgentIdentity:
    """What an agent process needs to join: picklable, so it crosses ``spawn``."""

    tpm_dir: str
    fingerprint: str  # hex SHA-256 of the server's raw public key
    server: tuple[str, int]

    @property
    def pinned(self) -> bytes:
        return bytes.fromhex(self.fingerprint)


def open_agent_tpm(tpm_dir: str | Path) -> SimulatedTpm:
    """Power on an enrolled bench TPM and do the measured launch the server allowlisted."""
    tpm = SimulatedTpm.open(tpm_dir)
    measured_launch(tpm, POLICY)
    return tpm


def ephemeral_pool(n: int) -> list[tuple[rsa.RSAPrivateKey, bytes]]:
    """Pre-generated ephemeral RSA keys (~50 ms each), reused round-robin by bench agents."""
    return [hs.generate_ephemeral() for _ in range(n)]


EventTap = Callable[[ev.Event], None]


@dataclass
class BenchServer:
    server: OrganisationServer
    address: tuple[str, int]
    fingerprint: str
    home: Path
    identities: list[AgentIdentity]
    taps: list[EventTap] = field(default_factory=list)
    starts: dict[tuple[int, int], float] = field(default_factory=dict)
    """time.monotonic() at which the server began each job (its START), by (job, attempt)."""

    def session_stats(self, session_id: int) -> dict[str, float]:
        """The server-side channel counters of a live session (empty if it is gone)."""
        endpoint = self.server.endpoint
        session = endpoint.session(session_id) if endpoint is not None else None
        if session is None or session.channel is None:
            return {}
        return session.channel.stats


def _instrument(bench: BenchServer) -> None:
    """Tap the server's event stream and note when each START is issued.

    OrganisationServer has no observer hook, so the bench wraps its two public
    entry points on this one instance: ``on_event`` (before ``start()``, which hands
    it to the adapter) and ``start_job``, through which the scheduler sends START.
    """
    server = bench.server
    on_event = server.on_event
    start_job = server.start_job

    def tapped(e: ev.Event) -> None:
        on_event(e)
        for tap in bench.taps:
            tap(e)

    def timed_start(session: Any, job: ev.JobDescription) -> None:
        bench.starts[(job.job, job.attempt)] = time.monotonic()
        start_job(session, job)

    setattr(server, "on_event", tapped)  # noqa: B010 - instance override on purpose
    setattr(server, "start_job", timed_start)  # noqa: B010


@contextlib.asynccontextmanager
async def bench_server(
    window: int = 64,
    *,
    agent_tpms: int = 1,
    workdir: Path | None = None,
    max_sessions: int = 100_000,
    idle_timeout: float = 60.0,
) -> AsyncIterator[BenchServer]:
    """A real server on 127.0.0.1:0 over a throw-away home, with enrolled bench TPMs."""
    home = Path(tempfile.mkdtemp(prefix="vcomp-bench-", dir=workdir))
    server: OrganisationServer | None = None
    try:
        fingerprint = init_server_home(home / "server")
        config = dataclasses.replace(
            load_server_config(home / "server"),
            bind_host=LOOPBACK,
            bind_port=0,
            window=window,
            max_sessions=max_sessions,
            idle_timeout=idle_timeout,
        )
        server = OrganisationServer(config)
        server.store.allow_measurement(golden_measurement(POLICY).format(), "bench agents")
        tpm_dirs = []
        for i in range(agent_tpms):
            tpm_dir = home / f"tpm{i}"
            enrolment = parse_enrolment(format_enrolment(SimulatedTpm.open(tpm_dir), f"bench{i}"))
            server.store.enroll_agent(enrolment.agent_id, enrolment.ak_public_pem, enrolment.name)
            tpm_dirs.append(str(tpm_dir))
        bench = BenchServer(server, (LOOPBACK, 0), fingerprint, home, [])
        _instrument(bench)
        bench.address = await server.start()
        bench.identities = [AgentIdentity(d, fingerprint, bench.address) for d in tpm_dirs]
        yield bench
    finally:
        if server is not None and server.endpoint is not None:
            await server.stop()
        shutil.rmtree(home, ignore_errors=True)


async def store_quiet(server: OrganisationServer, settle: float = 0.05) -> None:
    """Wait until the store writes the server queued so far (clock, last seen...) are done.

    The committer is one FIFO thread, so a no-op behind them is a barrier.
    """
    await asyncio.sleep(settle)  # let spawned tasks submit their writes
    await server.committer.run(lambda: None)


# ---------------------------------------------------------------------- worker processes

CommandHandler = Callable[[Any], Awaitable[Any]]


class Worker:
    """A spawned process that answers commands over a pipe (see :func:`serve_commands`).

    The server side uses uvloop, which is not fork-safe, hence ``spawn``. The target
    must be a module-level function taking the child's end of the pipe.
    """

    def __init__(self, target: Callable[[Connection], None]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child,), daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, command: Any) -> None:
        self._conn.send(command)

    async def receive(self, timeout: float = WORKER_TIMEOUT) -> Any:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._conn.poll, timeout):
            raise TimeoutError(f"worker {self.pid} did not answer within {timeout} s")
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"worker {self.pid} failed: {reply!r}") from reply
        return reply

    async def ask(self, command: Any, timeout: float = WORKER_TIMEOUT) -> Any:
        self.send(command)
        return await self.receive(timeout)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, 10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


async def close_all(workers: Sequence[Worker]) -> None:
    await asyncio.gather(*(w.close() for w in workers))


def serve_commands(conn: Connection, handle: CommandHandler) -> None:
    """Child side of :class:`Worker`: one uvloop loop for the process's lifetime.

    Each command is awaited with ``handle`` and answered with exactly one reply (an
    exception is shipped back and re-raised by the parent); ``None`` ends the child.
    Agents started by one command keep running while the next is awaited.
    """
    install_uvloop()
    asyncio.run(_serve_commands(conn, handle))


async def _serve_commands(conn: Connection, handle: CommandHandler) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            command = await loop.run_in_executor(None, conn.recv)
        except EOFError:
            return
        if command is None:
            return
        try:
            reply = await handle(command)
        except Exception as exc:  # the parent re-raises it, naming the worker
            reply = exc
        conn.send(reply)


# ---------------------------------------------------------------------- agent fleets

CONNECT_TIMEOUT = 180.0


class AgentFleet:
    """Command handler of an agent process: many LiteAgents sharing one enrolled TPM.

    Commands: ``("setup", identity, n_keys)``; ``("connect", n)`` starts n agents at
    once and answers when all are connected (or refused); ``("stats",)`` reports jobs
    done and CPU used since the last ``stats``; ``("disconnect",)`` stops them all.
    Ephemeral keys come from a small pool, reused round-robin (a bench shortcut: RSA
    keygen costs ~50 ms and a real agent makes a fresh key per session).
    """

    def __init__(self) -> None:
        self._tpm: SimulatedTpm | None = None
        self._identity: AgentIdentity | None = None
        self._keys: list[tuple[rsa.RSAPrivateKey, bytes]] = []
        self._agents: list[LiteAgent] = []
        self._cpu_mark = time.process_time()

    async def handle(self, command: tuple[Any, ...]) -> dict[str, Any]:
        kind, *args = command
        if kind == "setup":
            self._identity, n_keys = args
            self._tpm = open_agent_tpm(self._identity.tpm_dir)
            self._keys = ephemeral_pool(n_keys)
            return {}
        if kind == "connect":
            return await self._connect(args[0])
        if kind == "stats":
            cpu, self._cpu_mark = time.process_time() - self._cpu_mark, time.process_time()
            return {
                "jobs": sum(a.stats.jobs for a in self._agents),
                "committed": sum(a.stats.committed for a in self._agents),
                "cpu": cpu,
            }
        if kind == "disconnect":
            await asyncio.gather(*(a.stop() for a in self._agents))
            self._agents = []
            return {}
        raise ValueError(f"unknown command {kind!r}")

    async def _connect(self, n: int) -> dict[str, Any]:
        tpm, identity = self._tpm, self._identity
        assert tpm is not None and identity is not None
        latencies: list[float] = []
        failures: list[str] = []
        all_done = asyncio.Event()
        pending = n
        cpu0 = time.process_time()
        begin = time.monotonic()

        def on_event(e: ev.Event) -> None:
            nonlocal pending
            if isinstance(e, ev.Connected):
                latencies.append(time.monotonic() - begin)
            elif isinstance(e, ev.Rejected):
                failures.append(e.reason)
            else:
                return
            pending -= 1
            if pending == 0:
                all_done.set()

        agents = [
            LiteAgent(
                tpm=tpm,
                pinned=identity.pinned,
                server=identity.server,
                ephemeral=self._keys[i % len(self._keys)],
                on_event=on_event,
            )
            for i in range(n)
        ]
        self._agents += agents
        await asyncio.gather(*(a.start() for a in agents))
        try:
            await asyncio.wait_for(all_done.wait(), CONNECT_TIMEOUT)
        except TimeoutError:
            failures.append(f"{pending} agents not connected after {CONNECT_TIMEOUT} s")
        self._cpu_mark = time.process_time()
        return {
            "latencies": latencies,
            "failures": failures,
            "cpu": self._cpu_mark - cpu0,
            "seconds": time.monotonic() - begin,
        }


def fleet_process_main(conn: Connection) -> None:
    """Target of a :class:`Worker` running an :class:`AgentFleet`."""
    serve_commands(conn, AgentFleet().handle)


async def start_fleets(
    workers: Sequence[Worker], identities: Sequence[AgentIdentity], keys: int
) -> None:
    """Set each fleet worker up with its own enrolled TPM and key pool."""
    await asyncio.gather(
        *(w.ask(("setup", i, keys)) for w, i in zip(workers, identities, strict=True))
    )


def split(n: int, parts: int) -> list[int]:
    """n agents over ``parts`` processes, as evenly as possible."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
