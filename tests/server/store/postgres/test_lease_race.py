"""Two servers lease from one PostgreSQL at once: two real processes, each with its own
PostgresStore and pool, race through 10,000 single-replica jobs with the same agents.
Every job ends with exactly one leased attempt, and no (job, attempt) was handed out
twice."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from collections import Counter

from tests.pg import fresh_schema_url
from tests.server.store.support import enroll
from vcomp.pgcluster import PostgresCluster
from vcomp.server.store.postgres import PostgresStore

JOBS = 10_000
AGENTS = 4
SERVERS = 2

# One "server": lease for every agent, a group per transaction, until nothing is left.
LEASER = textwrap.dedent(
    """
    import json, sys
    from vcomp.server.store import LeaseRequest
    from vcomp.server.store.postgres import PostgresStore

    url, agents = sys.argv[1], json.loads(sys.argv[2])
    got = []
    with PostgresStore(url, migrate=False) as store:
        while True:
            leases = store.lease_many([LeaseRequest(a, 1.0, 600.0) for a in agents])
            got += [[l.job_id, l.attempt, l.agent_id] for l in leases if l is not None]
            if all(l is None for l in leases):
                break
    print(json.dumps(got))
    """
)


def test_two_servers_never_lease_one_attempt_twice(pg_cluster: PostgresCluster) -> None:
    url = fresh_schema_url(pg_cluster)
    with PostgresStore(url) as store:
        store.add_app("pi", "python", io.BytesIO(b""))
        agents = [enroll(store, f"agent-{i}") for i in range(AGENTS)]
        batch = store.create_batch("pi", (b"%d" % i for i in range(JOBS)))
    servers = [
        subprocess.Popen(
            [sys.executable, "-c", LEASER, url, json.dumps(agents)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(SERVERS)
    ]
    handed: list[tuple[int, int, str]] = []
    per_server = []
    for server in servers:
        out, err = server.communicate(timeout=600)
        assert server.returncode == 0, err[-2000:]
        leases = [tuple(x) for x in json.loads(out)]
        per_server.append(len(leases))
        handed += leases  # type: ignore[arg-type]
    twice = [key for key, n in Counter((j, a) for j, a, _ in handed).items() if n > 1]
    assert twice == []
    assert len(handed) == JOBS
    assert all(n > 0 for n in per_server), per_server  # both servers really raced
    with PostgresStore(url, migrate=False) as store:
        status = store.batch_status(batch)
        assert (status.leased, status.queued) == (JOBS, 0)
        with store.database.transaction() as conn:
            rows = conn.execute(
                "SELECT job_id, COUNT(*), MIN(state), MAX(state), MIN(agent_id) FROM attempts "
                "GROUP BY job_id"
            ).fetchall()
    assert len(rows) == JOBS
    assert all(n == 1 and lo == hi == "leased" for _, n, lo, hi, _ in rows)
    owners = {(j, a): agent for j, a, agent in handed}
    assert {(int(r[0]), 1): r[4] for r in rows} == owners  # the store agrees who holds what
