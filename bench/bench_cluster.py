"""Several servers: durable tiny-job dispatch on SQLite and on PostgreSQL, one and two servers.

    python bench/bench_cluster.py [--quick] [--json PATH] [--agents N] [--jobs J]

Every system runs the same way: ``vcomp-server serve`` processes (logging at WARNING)
over one server home, the same N protocol-only agents
(:class:`~vcomp.loadgen.LiteAgent`) in two spawned fleet processes, a batch of J tiny
jobs (a 64-byte app, ~10-byte inputs), each through the whole cycle (lease commit,
START/CODE/END, RESULT, result commit, ACK). With two servers each fleet talks to
its own server. The systems are SQLite with one server, and PostgreSQL (a throwaway
cluster on a Unix socket, fsync on, ``synchronous_commit=on``) with one and with two.

"jobs/s" is the steady rate between 10% and 90% of the batch done (the store is
polled every 50 ms), so connecting and the first offer tick are left out. CPU per
job is measured over the same span from /proc: each server process, the PostgreSQL
postmaster with every backend, and the agent fleets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.demo import free_port
from vcomp.pgcluster import PostgresCluster, postgres_bindir
from vcomp.server.config import init_server_home
from vcomp.server.store import open_store

BIN = Path(sys.executable).parent
SERVER_CLI = str(BIN / "vcomp-server")
APP_CODE = b"def main(data):\n    return data  # a tiny app for the cluster bench\n"
SYSTEMS = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))
FLEETS = 2
TARGET_PG_SHARE = 0.60  # PostgreSQL with one server vs SQLite
TARGET_TWO_SERVERS = 1500.0  # jobs/s in total
POLL_SECONDS = 0.05
JOB_TIMEOUT = 600.0


@dataclass
class Row:
    system: str
    servers: int
    agents: int
    jobs: int
    seconds: float = float("nan")  # the 10%..90% span
    done: int = 0
    server_cpu: list[float] = field(default_factory=list)  # per server process, seconds
    postgres_cpu: float = 0.0
    fleet_cpu: float = 0.0

    @property
    def per_second(self) -> float:
        return 0.8 * self.jobs / self.seconds

    def ms_per_job(self, cpu: float) -> float:
        return 1000 * cpu / (0.8 * self.jobs)

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_second"] = self.per_second
        out["server_cpu_ms_per_job"] = [self.ms_per_job(c) for c in self.server_cpu]
        out["postgres_cpu_ms_per_job"] = self.ms_per_job(self.postgres_cpu)
        out["fleet_cpu_ms_per_job"] = self.ms_per_job(self.fleet_cpu)
        return out


NO_HTTP = ("--http-bind", "")  # two servers on one host: no HTTP port to share


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        # A backend that ended meanwhile: its CPU is lost to the count.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += common.process_cpu_seconds(pid)
    return total


def postgres_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster and its children (backends, walwriter, checkpointer...)."""
    postmaster = cluster.postmaster_pid()
    if postmaster is None:
        raise RuntimeError("PostgreSQL is not running")
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    return [postmaster, *map(int, children)]


def make_home(root: Path, name: str, url: str | None, n_tpms: int) -> tuple[Path, str, list[str]]:
    """A server home on ``url`` (None: SQLite), with fleet TPMs enrolled and allowed."""
    home = root / name
    fingerprint = init_server_home(home, store_url=url)
    toml = home / "server.toml"
    text = toml.read_text()
    # Every fleet is one identity with many sessions and leases.
    text = re.sub(r"(?m)^max_sessions_per_agent = .*$", "max_sessions_per_agent = 10000", text)
    text = re.sub(r"(?m)^max_leases_per_agent = .*$", "max_leases_per_agent = 10000", text)
    toml.write_text(text)
    app = root / "tiny.py"
    app.write_bytes(APP_CODE)
    tpm_dirs = []
    with open_store(url or "sqlite:jobs.sqlite", base=home) as store:
        store.allow_measurement(golden_measurement(common.POLICY).format(), "bench agents")
        store.add_app("tiny", "python", app)
        for i in range(n_tpms):
            tpm_dir = root / f"tpm{i}"
            e = parse_enrolment(format_enrolment(SimulatedTpm.open(tpm_dir), f"bench{i}"))
            store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
            tpm_dirs.append(str(tpm_dir))
    return home, fingerprint, tpm_dirs


async def start_servers(
    home: Path, n: int, root: Path
) -> list[tuple[subprocess.Popen[bytes], int]]:
    servers = []
    env = {**os.environ, "VCOMP_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    for i in range(n):
        port = free_port()
        out = root / f"{home.name}-serve{i}.out"
        err = root / f"{home.name}-serve{i}.err"
        proc = subprocess.Popen(
            [SERVER_CLI, "serve", "--config", str(home), "--bind", f"127.0.0.1:{port}", *NO_HTTP],
            stdout=out.open("wb"),
            stderr=err.open("wb"),
            env=env,
        )
        deadline = time.monotonic() + 30
        while "listening on" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {i} did not start: {err.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        servers.append((proc, port))
    return servers


def stop_servers(servers: Sequence[tuple[subprocess.Popen[bytes], int]]) -> None:
    for proc, _ in servers:
        proc.terminate()
    for proc, _ in servers:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure_one(
    system: str,
    n_servers: int,
    cluster: PostgresCluster | None,
    workers: Sequence[common.Worker],
    root: Path,
    n_agents: int,
    n_jobs: int,
) -> Row:
    name = f"{system}-{n_servers}"
    url = cluster.fresh_schema_url() if cluster is not None else None
    home, fingerprint, tpm_dirs = make_home(root, name, url, len(workers))
    row = Row(system, n_servers, n_agents, n_jobs)
    servers = await start_servers(home, n_servers, root)
    store = open_store(url or "sqlite:jobs.sqlite", base=home)
    try:
        identities = [
            common.AgentIdentity(d, fingerprint, ("127.0.0.1", servers[i % n_servers][1]))
            for i, d in enumerate(tpm_dirs)
        ]
        await common.start_fleets(workers, identities, 4)
        shares = common.split(n_agents, len(workers))
        await asyncio.gather(*(w.ask(("connect", k)) for w, k in zip(workers, shares, strict=True)))
        await asyncio.sleep(1.0)  # let connect-time writes settle
        batch = store.create_batch("tiny", [b'{"i": %d}' % i for i in range(n_jobs)])
        server_pids = [p.pid for p, _ in servers]
        pg_pids = postgres_pids(cluster) if cluster is not None else []
        marks: dict[str, tuple[float, list[float], float, float]] = {}
        deadline = time.monotonic() + JOB_TIMEOUT
        await asyncio.gather(*(w.ask(("stats",)) for w in workers))
        while True:
            done = store.batch_status(batch).done
            now = time.monotonic()
            for label, share in (("start", 0.1), ("end", 0.9)):
                if label not in marks and done >= share * n_jobs:
                    fleet = await asyncio.gather(*(w.ask(("stats",)) for w in workers))
                    if cluster is not None:
                        pg_pids = sorted(set(pg_pids) | set(postgres_pids(cluster)))
                    marks[label] = (
                        now,
                        [cpu_seconds([pid]) for pid in server_pids],
                        cpu_seconds(pg_pids),
                        sum(f["cpu"] for f in fleet),
                    )
            if done >= n_jobs:
                break
            if now > deadline:
                raise TimeoutError(f"{system}: {done} of {n_jobs} jobs done")
            await asyncio.sleep(POLL_SECONDS)
        (t0, s0, p0, _), (t1, s1, p1, f1) = marks["start"], marks["end"]
        row.seconds = t1 - t0
        row.server_cpu = [b - a for a, b in zip(s0, s1, strict=True)]
        row.postgres_cpu = p1 - p0
        row.fleet_cpu = f1
        row.done = store.batch_status(batch).done
        await asyncio.gather(*(w.ask(("disconnect",)) for w in workers))
    finally:
        store.close()
        stop_servers(servers)
    return row


async def measure(n_agents: int, n_jobs: int) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="vcomp-bench-cluster-"))
    workers = [common.Worker(common.fleet_process_main) for _ in range(FLEETS)]
    rows = []
    try:
        with PostgresCluster() as cluster:
            for system, n in SYSTEMS:
                pg = cluster if system == "postgresql" else None
                rows.append(await measure_one(system, n, pg, workers, root, n_agents, n_jobs))
    finally:
        await common.close_all(workers)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def run(
    *, quick: bool = False, agents: int | None = None, jobs: int | None = None
) -> dict[str, Any]:
    if postgres_bindir() is None:
        return {"bench": "cluster", "skipped": "PostgreSQL binaries not found"}
    agents = agents or (40 if quick else 100)
    jobs = jobs or (3000 if quick else 10000)
    rows = asyncio.run(measure(agents, jobs))
    rate = {(r.system, r.servers): r.per_second for r in rows}
    share = rate[("postgresql", 1)] / rate[("sqlite", 1)]
    two = rate[("postgresql", 2)]
    return {
        "bench": "cluster",
        "rows": [r.figures() for r in rows],
        "pg_share": share,
        "two_servers_per_second": two,
        "target_pg_share": TARGET_PG_SHARE,
        "target_two_servers": TARGET_TWO_SERVERS,
        "pg_share_verdict": common.verdict(share, TARGET_PG_SHARE),
        "two_servers_verdict": common.verdict(two, TARGET_TWO_SERVERS),
    }


def print_report(figures: dict[str, Any]) -> None:
    if "skipped" in figures:
        print(f"cluster bench skipped: {figures['skipped']}")
        return
    columns = [
        "system",
        "servers",
        "agents",
        "jobs",
        "jobs/s",
        "server CPU ms/job (each)",
        "PostgreSQL CPU ms/job",
        "agents CPU ms/job",
    ]
    rows = [
        [
            r["system"],
            r["servers"],
            r["agents"],
            r["jobs"],
            r["per_second"],
            " + ".join(f"{v:.2f}" for v in r["server_cpu_ms_per_job"]),
            r["postgres_cpu_ms_per_job"],
            r["fleet_cpu_ms_per_job"],
        ]
        for r in figures["rows"]
    ]
    common.print_table(
        "Durable tiny-job dispatch: SQLite vs PostgreSQL, one and two servers", columns, rows
    )
    print(
        f"PostgreSQL, one server: {figures['pg_share']:.0%} of SQLite's rate "
        f"(target >= {TARGET_PG_SHARE:.0%}): {figures['pg_share_verdict']}"
    )
    print(
        f"PostgreSQL, two servers: {figures['two_servers_per_second']:,.0f} jobs/s "
        f"(target >= {TARGET_TWO_SERVERS:,.0f}): {figures['two_servers_verdict']}"
    )


def main() -> None:
    parser = common.bench_parser(__doc__ or "")
    parser.add_argument("--agents", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    figures = run(quick=args.quick, agents=args.agents, jobs=args.jobs)
    print_report(figures)
    if args.json:
        common.write_json(args.json, figures)


if __name__ == "__main__":
    main()
