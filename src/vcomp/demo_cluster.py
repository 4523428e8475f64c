"""``make demo-cluster``: PostgreSQL, two servers, three agents, and one server killed.

A throwaway PostgreSQL cluster (Debian's ``postgresql`` package, run as an
unprivileged user on a Unix socket) holds the job store. Two ``vcomp-server serve``
processes share it and one server home (``--bind`` gives each its port); three
agents know both servers. Halfway through the π batch one server is SIGKILLed; the
demo then shows where each agent's sessions went and that every job was recorded
exactly once.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vcomp.demo import AGENT, SERVER, build_job, fields, free_port, run, start, stop_all, wait_for
from vcomp.pgcluster import PostgresCluster, postgres_bindir
from vcomp.server.store import Store, open_store

JOBS = 40
AGENTS = 3


def sessions(log: Path) -> list[tuple[float, str]]:
    """(wall time, server) of each session an agent established."""
    out = []
    for line in log.read_text().splitlines():
        f = fields(line)
        if f.get("event") == "session_established" and "server" in f:
            stamp = datetime.datetime.fromisoformat(line.split(" ", 1)[0])
            out.append((stamp.timestamp(), f["server"]))  # logged in local time
    return out


def pi_estimate(store: Store, batch: int) -> tuple[float, float, int]:
    inside = points = 0
    for rec in store.iter_results(batch):
        assert rec.result is not None
        with store.open_output(rec.job_id, rec.result.attempt) as blob:
            out = json.loads(blob.read(0, blob.size))
        inside += int(out["inside"])
        points += int(out["points"])
    estimate = 4 * inside / points
    return estimate, 4 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / points), points


def main() -> int:
    if postgres_bindir() is None:
        print("demo-cluster needs PostgreSQL's server binaries: apt-get install postgresql")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vcomp-demo-cluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print(f"demo directory: {work}")
        with PostgresCluster() as pg:  # started here, removed at the end
            print(f"PostgreSQL running on a Unix socket in {pg.root}")
            return _demo(work, pg.url, procs)
    finally:
        stop_all(procs)
        if os.environ.get("VCOMP_DEMO_KEEP"):
            print(f"kept {work} (VCOMP_DEMO_KEEP set)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path, url: str, procs: list[subprocess.Popen[bytes]]) -> int:
    srv = work / "server"
    run(SERVER, "init", str(srv), "--store", url)
    run(SERVER, "migrate", "--config", str(srv))
    # Agents notice a dead server after the idle timeout the server set: 10 s, not 60.
    toml = srv / "server.toml"
    toml.write_text(toml.read_text().replace("idle_timeout = 60.0", "idle_timeout = 10.0"))
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    agents = [work / f"agent{i}" for i in range(1, AGENTS + 1)]
    for i, home in enumerate(agents):
        # Each agent starts with the server first in its list: agents 1 and 3 on A.
        order = addresses if i % 2 == 0 else addresses[::-1]
        servers = [arg for a in order for arg in ("--server", a)]
        run(AGENT, "init", str(home), "--name", home.name, *servers,
            "--server-key", str(srv / "server.pub"))  # fmt: skip
        line = next(
            ln
            for ln in run(AGENT, "enrolment", "--config", str(home)).splitlines()
            if ln.startswith("vcomp-enrol/")
        )
        run(SERVER, "enroll", "--config", str(srv), line)
    run(SERVER, "allow-measurement", "--config", str(srv),
        run(AGENT, "measure", "--config", str(agents[0])).strip())  # fmt: skip
    program, kind, total_points = build_job(work)
    run(SERVER, "app", "add", "--config", str(srv), "pi", str(program), "--kind", kind)
    per_job = total_points // JOBS
    inputs = work / "inputs.jsonl"
    inputs.write_text(
        "".join(json.dumps({"points": per_job, "seed": i + 1}) + "\n" for i in range(JOBS))
    )
    print(f"job: Monte-Carlo pi, {kind}, {JOBS} jobs x {per_job:,} points")

    server_logs = [work / f"server{i}.log" for i in (1, 2)]
    for address, log in zip(addresses, server_logs, strict=True):
        serve = [SERVER, "serve", "--config", str(srv), "--bind", address]
        procs.append(start([*serve, "--http-bind", "127.0.0.1:0"], log))
        wait_for(log, "event=server_started", procs[-1], f"server on {address}")
        print(f"server listening on {address} (idle timeout 10 s)")
    agent_logs = [work / f"{home.name}.log" for home in agents]
    for home, log in zip(agents, agent_logs, strict=True):
        procs.append(start([AGENT, "join", "--config", str(home), "--mode", "full"], log))

    started = time.monotonic()
    batch = int(run(SERVER, "submit", "--config", str(srv), "pi", "--inputs", str(inputs),
                    "--cpu-seconds", "120", "--wall-seconds", "300").strip())  # fmt: skip
    store = open_store(url)
    try:
        while store.batch_status(batch).done < JOBS // 2:
            if time.monotonic() - started > 600:
                raise SystemExit("demo-cluster: the batch made no progress")
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        killed_at = time.time()
        done_at_kill = store.batch_status(batch).done
        print(f"SIGKILLed the server on {addresses[0]} with {done_at_kill} of {JOBS} jobs done")
        code = subprocess.run(
            [SERVER, "wait", "--config", str(srv), str(batch), "--timeout", "600"], check=False
        ).returncode
        if code != 0:
            print(f"demo-cluster: the batch did not finish cleanly (wait exit {code})")
            return 1
        elapsed = time.monotonic() - started
        recorded = [(r.job_id, r.result.attempt) for r in store.iter_results(batch) if r.result]
        estimate, sigma, points = pi_estimate(store, batch)
        unfinished = [
            f"job {a.job_id} attempt {a.attempt}: {a.state.value} ({a.reason})"
            for rec in store.iter_results(batch)
            for a in store.list_attempts(rec.job_id)
            if a.state.value != "succeeded"
        ]
    finally:
        store.close()

    print()
    error = f"error {estimate - math.pi:+.1e}, 1 sigma {sigma:.1e}"
    print(f"{'pi estimate':<18} {estimate:.8f}  ({error})")
    print(f"{'jobs recorded':<18} {len(recorded)} of {JOBS}, {len(set(recorded))} distinct")
    print(f"{'elapsed':<18} {elapsed:.1f} s for {points:,} points")
    print(f"{'attempts cut off':<18} {len(unfinished)}")
    for line in unfinished:
        print(f"  {line}")
    print("where each agent's sessions went (server: sessions before / after the kill):")
    for home, log in zip(agents, agent_logs, strict=True):
        seen = sessions(log)
        parts = []
        for address in addresses:
            before = sum(1 for t, s in seen if s == address and t < killed_at)
            after = sum(1 for t, s in seen if s == address and t >= killed_at)
            parts.append(f"{address} {before}/{after}")
        moved = any(s == addresses[1] for t, s in seen if t >= killed_at) and any(
            s == addresses[0] for t, s in seen if t < killed_at
        )
        print(f"  {home.name:<8} {'   '.join(parts)}{'   moved' if moved else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
