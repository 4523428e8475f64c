"""Job store throughput: group-committed results, and lease+record dispatch cycles, on
each backend (SQLite; PostgreSQL in a throwaway cluster when it is installed).

Prints a table, a row per scenario and backend. Every counted result is durably
committed (SQLite: synchronous=FULL, WAL; PostgreSQL: synchronous_commit=on).

    python bench/bench_store.py [--quick] [--backend sqlite|postgresql|both] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import platform
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vcomp.pgcluster import PostgresCluster, postgres_bindir
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import Lease, LeaseRequest, OutcomeKind, ResultSubmission
from vcomp.server.store.postgres import PostgresStore
from vcomp.server.store.sql.store import SqlStore
from vcomp.server.store.sqlite import SqliteStore

LEASE_SECONDS = 600.0


@dataclass
class Row:
    backend: str
    scenario: str
    concurrency: int
    operations: int
    seconds: float
    per_second: float
    commits: int
    per_commit: float


class Backends:
    """Opens a fresh store of one backend per scenario."""

    def __init__(self, workdir: Path, cluster: PostgresCluster | None) -> None:
        self.workdir = workdir
        self.cluster = cluster

    def open(self, backend: str, label: str) -> SqlStore:
        if backend == "postgresql":
            assert self.cluster is not None
            return PostgresStore(self.cluster.fresh_schema_url())
        return SqliteStore(self.workdir / f"{label}.db")


def enroll(store: SqlStore, name: str) -> str:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return store.enroll_agent(hashlib.sha256(der).hexdigest(), pem, name).agent_id


def fresh_store(
    where: Backends, backend: str, label: str, n_jobs: int, n_agents: int
) -> tuple[SqlStore, list[str]]:
    store = where.open(backend, label)
    store.add_app("tiny", "python", io.BytesIO(b"def main(x): return x"))
    agents = [enroll(store, f"sim-{i}") for i in range(n_agents)]
    store.create_batch("tiny", (b"%d" % i for i in range(n_jobs)))
    return store, agents


def tiny_result(lease: Lease) -> ResultSubmission:
    return ResultSubmission(
        lease.job_id, lease.attempt, lease.agent_id, output=b"r%d" % lease.index, cpu_ms=1
    )


async def bench_results(where: Backends, backend: str, submitters: int, n_results: int) -> Row:
    """N coroutines each submit results one after another; all share one committer."""
    store, [agent] = fresh_store(where, backend, f"results-{submitters}", n_results, 1)
    leases: list[Lease] = []
    while len(leases) < n_results:
        got = store.lease_many([LeaseRequest(agent, 0.0, LEASE_SECONDS)] * 1000)
        leases.extend(g for g in got if g is not None)
    work = iter(leases)
    committer = GroupCommitter(store)

    async def submitter() -> None:
        for lease in work:
            outcome = await committer.submit_result(tiny_result(lease))
            assert outcome.kind is OutcomeKind.ACCEPTED

    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    elapsed = time.perf_counter() - start
    await committer.close()
    store.close()
    done = committer.results_committed
    return Row(
        backend, "results via GroupCommitter", submitters, done, elapsed, done / elapsed,
        committer.commits, done / max(committer.commits, 1),
    )  # fmt: skip


async def bench_dispatch(where: Backends, backend: str, agents: int, n_jobs: int) -> Row:
    """Simulated agents loop lease -> record; every lease and result is committed."""
    store, agent_ids = fresh_store(where, backend, f"dispatch-{agents}", n_jobs, agents)
    committer = GroupCommitter(store)
    cycles = 0

    async def agent(agent_id: str) -> None:
        nonlocal cycles
        while (lease := await committer.lease(agent_id, 0.0, LEASE_SECONDS)) is not None:
            outcome = await committer.submit_result(tiny_result(lease))
            assert outcome.kind is OutcomeKind.ACCEPTED
            cycles += 1

    start = time.perf_counter()
    await asyncio.gather(*(agent(a) for a in agent_ids))
    elapsed = time.perf_counter() - start
    await committer.close()
    store.close()
    return Row(
        backend, "lease+record cycles", agents, cycles, elapsed, cycles / elapsed,
        committer.commits, cycles / max(committer.commits, 1),
    )  # fmt: skip


def bench_unbatched(where: Backends, backend: str, n_jobs: int) -> Row:
    """Reference: one thread, one lease transaction and one result transaction per job."""
    store, [agent] = fresh_store(where, backend, "unbatched", n_jobs, 1)
    start = time.perf_counter()
    cycles = 0
    while (lease := store.lease_next(agent, 0.0, LEASE_SECONDS)) is not None:
        store.record_results([tiny_result(lease)])
        cycles += 1
    elapsed = time.perf_counter() - start
    store.close()
    return Row(
        backend, "lease+record, no group commit", 1, cycles, elapsed, cycles / elapsed,
        2 * cycles, 0.5,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (CI smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: a temp dir)")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql", "both"),
        default="both",
        help="which store backends (both: PostgreSQL only where it is installed)",
    )
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if args.backend == "both" and postgres_bindir() is None:
        print("PostgreSQL is not installed: SQLite rows only")
        backends = ["sqlite"]
    scale = 0.1 if args.quick else 1.0

    def n(count: int) -> int:
        return max(50, int(count * scale))

    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        cluster = None
        if "postgresql" in backends:
            cluster = stack.enter_context(PostgresCluster())
        where = Backends(workdir, cluster)
        for backend in backends:
            for submitters, count in ((1, 1000), (10, 5000), (100, 20000), (1000, 40000)):
                rows.append(asyncio.run(bench_results(where, backend, submitters, n(count))))
            rows.append(bench_unbatched(where, backend, n(1000)))
            for agents, count in ((10, 10000), (100, 20000), (1000, 40000)):
                rows.append(asyncio.run(bench_dispatch(where, backend, agents, n(count))))

    header = (
        f"{'backend':<12}{'scenario':<32}{'conc':>6}{'ops':>8}{'seconds':>9}{'ops/s':>10}"
        f"{'commits':>9}{'ops/commit':>11}"
    )
    print(
        f"job store: SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL); PostgreSQL "
        "(throwaway cluster on a Unix socket, synchronous_commit=on, fsync on)"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.backend:<12}{r.scenario:<32}{r.concurrency:>6}{r.operations:>8}{r.seconds:>9.2f}"
            f"{r.per_second:>10.0f}{r.commits:>9}{r.per_commit:>11.1f}"
        )
    for backend in backends:
        best = max(
            r.per_second
            for r in rows
            if r.scenario == "lease+record cycles" and r.backend == backend
        )
        print(f"{backend} dispatch ceiling from the store: {best:.0f} tiny jobs/s")
    if args.json:
        meta = {"sqlite": sqlite3.sqlite_version, "python": platform.python_version(),
                "quick": args.quick}  # fmt: skip
        args.json.write_text(
            json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
        )


if __name__ == "__main__":
    main()
