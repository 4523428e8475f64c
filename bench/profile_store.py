"""Where a lease and a record go on PostgreSQL: statements (round trips) and their time.

Opens a throwaway cluster, queues N tiny jobs, then leases and records them in groups
of ``--group`` (as the GroupCommitter does), counting every statement the store sends,
the transaction starts and commits psycopg adds, and the time each kind takes.

    python bench/profile_store.py [--jobs 2000] [--group 10]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_store import enroll, tiny_result

from vcomp.pgcluster import PostgresCluster
from vcomp.server.store import LeaseRequest
from vcomp.server.store.postgres import PostgresStore
from vcomp.server.store.postgres import database as pg_database
from vcomp.server.store.sql.database import Cursor

LEASE_SECONDS = 600.0


class Tally:
    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, sql: str, seconds: float) -> None:
        key = " ".join(sql.split())[:90]
        self.count[key] += 1
        self.seconds[key] += seconds

    def report(self, title: str, per: int) -> None:
        total_n = sum(self.count.values())
        total_s = sum(self.seconds.values())
        print(f"\n{title}: {total_n / per:.2f} round trips and {total_s / per * 1e6:.0f} µs each")
        for key in sorted(self.count, key=lambda k: -self.seconds[k]):
            n, s = self.count[key], self.seconds[key]
            print(f"  {n / per:6.2f} x {s / n * 1e6:6.0f} µs  {key}")


@contextmanager
def counting(tally: Tally) -> Iterator[None]:
    """Count every statement, and the BEGIN and COMMIT around each transaction."""
    conn_cls = pg_database.PostgresConnection
    real_execute = conn_cls.execute
    real_transaction = pg_database.PostgresDatabase.transaction

    def execute(self: Any, sql: str, params: Any = None, /) -> Cursor:
        start = time.perf_counter()
        cur = real_execute(self, sql, params)
        tally.add(sql, time.perf_counter() - start)
        return cur

    @contextmanager
    def transaction(self: Any, **kwargs: Any) -> Iterator[Any]:
        outer = getattr(self._local, "active", None) is None
        if outer:
            tally.count["BEGIN"] += 1
        with real_transaction(self, **kwargs) as conn:
            yield conn
            start = time.perf_counter()
        if outer:  # the commit ran as the context closed
            tally.add("COMMIT (with BEGIN, sent with the first statement)", 0.0)
            tally.seconds["COMMIT (with BEGIN, sent with the first statement)"] += (
                time.perf_counter() - start
            )
            tally.count["BEGIN"] -= 1

    conn_cls.execute = execute  # type: ignore[method-assign]
    pg_database.PostgresDatabase.transaction = transaction  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        conn_cls.execute = real_execute  # type: ignore[method-assign]
        pg_database.PostgresDatabase.transaction = real_transaction  # type: ignore[method-assign]
        tally.count.pop("BEGIN", None)


def server_cpu_seconds(postmaster: int | None) -> float:
    """CPU seconds used so far by the postmaster and its live children (the backends)."""
    if postmaster is None:
        return 0.0
    total = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(name) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--group", type=int, default=10)
    args = parser.parse_args()
    with PostgresCluster() as cluster:
        store = PostgresStore(cluster.fresh_schema_url())
        store.add_app("tiny", "python", io.BytesIO(b"def main(x): return x"))
        agents = [enroll(store, f"sim-{i}") for i in range(args.group)]
        store.create_batch("tiny", (b"%d" % i for i in range(args.jobs)))
        lease_tally, record_tally = Tally(), Tally()
        leased = recorded = 0
        server_cpu, client_cpu = server_cpu_seconds(cluster.postmaster_pid()), client_cpu_seconds()
        start = time.perf_counter()
        while True:
            with counting(lease_tally):
                got = store.lease_many([LeaseRequest(a, 0.0, LEASE_SECONDS) for a in agents])
            leases = [lease for lease in got if lease is not None]
            if not leases:
                break
            leased += len(leases)
            with counting(record_tally):
                store.record_results([tiny_result(lease) for lease in leases])
            recorded += len(leases)
        elapsed = time.perf_counter() - start
        server_cpu = server_cpu_seconds(cluster.postmaster_pid()) - server_cpu
        client_cpu = client_cpu_seconds() - client_cpu
        store.close()
    lease_tally.report("per lease", leased)
    record_tally.report("per record", recorded)
    print(f"\n{recorded} lease+record cycles in groups of {args.group}: {recorded / elapsed:.0f}/s")
    print(
        f"per cycle: {elapsed / recorded * 1e6:.0f} µs wall, {client_cpu / recorded * 1e6:.0f} µs "
        f"CPU in this process, {server_cpu / recorded * 1e6:.0f} µs CPU in PostgreSQL"
    )


if __name__ == "__main__":
    main()
