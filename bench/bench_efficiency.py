"""Efficiency against redundant computing: attested single replicas against BOINC's 2-of-2.

    python bench/bench_efficiency.py [--quick] [--json PATH] [--reps N]

One server (``vcomp-server serve``) and two volunteer agents (``vcomp-agent join --mode
full``), all real processes started through the console scripts, with the real sandbox.
The same Monte-Carlo π batch (1e9 points; ``--quick``: 1e8) runs with ``--replicas 1``
(the attested default) and with ``--replicas 2 --quorum 2`` (BOINC's default), the two
alternating, ``--reps`` times each. The job is server/examples/pi.c compiled with the C
compiler when one exists, else pi.py with 10x fewer points.

Useful work per CPU-second = the batch's points / the CPU the agents spent on it: the
whole agent process trees (daemon + sandbox + job, from /proc utime+stime+cutime+cstime),
and, separately, the jobs' own CPU as the agents report it (``cpu_ms`` of every result,
replicas included). Wall time runs from the batch's creation to its last job being done
(the server looks for new batches every 0.5 s, so both rows carry up to 0.5 s of that).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import bench_parser, median, print_table, write_json

from vcomp.server.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "server" / "examples"
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BATCH_TIMEOUT = 600.0
STALL_SECONDS = 60.0  # no job finished for this long: report the logs instead of waiting
JOIN_TIMEOUT = 60.0
CONFIGS = (("replicas 1 (attested)", 1, 1), ("replicas 2, quorum 2 (BOINC default)", 2, 2))


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def cli(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of every child it has waited for."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def build_job(work: Path) -> tuple[Path, str, int]:
    """(program, kind, points scale): pi.c natively if a C compiler works, else pi.py / 10."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        exe = work / "pi"
        proc = subprocess.run(
            [cc, "-O2", "-o", str(exe), str(EXAMPLES / "pi.c")], capture_output=True, check=False
        )
        if proc.returncode == 0:
            return exe, "exec", 1
    return EXAMPLES / "pi.py", "python", 10


@dataclass
class Deployment:
    home: Path
    server_home: Path
    agents: list[subprocess.Popen[bytes]]
    kind: str
    program: str
    scale: int


@contextmanager
def deployment(work: Path) -> Iterator[Deployment]:
    """init + enrol + allowlist + app add, then serve and join 2 agents; stop on exit."""
    port = free_port()
    srv = work / "server"
    cli(tool("vcomp-server"), "init", str(srv))
    toml = srv / "server.toml"
    toml.write_text(re.sub(r"(?m)^bind = .*$", f'bind = "127.0.0.1:{port}"', toml.read_text()))
    homes = [work / f"agent{i}" for i in (1, 2)]
    for home in homes:
        cli(
            tool("vcomp-agent"),
            "init",
            str(home),
            "--name",
            home.name,
            "--server",
            f"127.0.0.1:{port}",
            "--server-key",
            str(srv / "server.pub"),
        )
        line = next(
            ln
            for ln in cli(tool("vcomp-agent"), "enrolment", "--config", str(home)).splitlines()
            if ln.startswith("vcomp-enrol/")
        )
        cli(tool("vcomp-server"), "enroll", "--config", str(srv), line)
    measurement = cli(tool("vcomp-agent"), "measure", "--config", str(homes[0])).strip()
    cli(tool("vcomp-server"), "allow-measurement", "--config", str(srv), measurement)
    program, kind, scale = build_job(work)
    cli(
        tool("vcomp-server"), "app", "add", "--config", str(srv), "pi", str(program), "--kind", kind
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [tool("vcomp-server"), "serve", "--config", str(srv), "--http-bind", ""],
                stdout=subprocess.DEVNULL,
                stderr=(work / "server.log").open("wb"),
            )
        )
        for home in homes:
            procs.append(
                subprocess.Popen(
                    [tool("vcomp-agent"), "join", "--config", str(home), "--mode", "full"],
                    stdout=subprocess.DEVNULL,
                    stderr=(work / f"{home.name}.log").open("wb"),
                )
            )
        yield Deployment(work, srv, procs[1:], kind, program.name, scale)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def log_tail(work: Path, lines: int = 5) -> str:
    out = []
    for path in sorted(work.glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"{path.name}: " + " | ".join(tail))
    return "\n".join(out)


def wait_for_agents(dep: Deployment) -> None:
    """Both agents attested and connected, or the server's reason why not."""
    log = dep.home / "server.log"
    deadline = time.monotonic() + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        agents = {
            m.group(1) for ln in lines if (m := re.search(r"session_established.* agent=(\S+)", ln))
        }
        if len(agents) >= len(dep.agents):
            return
        rejected = [ln for ln in lines if "handshake_rejected" in ln]
        if rejected:
            raise RuntimeError(f"the server rejected an agent: {rejected[-1][:300]}")
        if any(p.poll() is not None for p in dep.agents):
            raise RuntimeError("an agent exited:\n" + log_tail(dep.home))
        time.sleep(0.1)
    raise TimeoutError(f"agents not connected after {JOIN_TIMEOUT:.0f} s:\n" + log_tail(dep.home))


def run_batch(
    dep: Deployment, points: int, jobs: int, replicas: int, quorum: int, seed0: int
) -> dict[str, Any]:
    per_job = points // jobs
    inputs = [json.dumps({"points": per_job, "seed": seed0 + i}).encode() for i in range(jobs)]
    store = SqliteStore(dep.server_home / "jobs.sqlite")
    try:
        cpu0 = sum(tree_cpu_seconds(p.pid) for p in dep.agents)
        t0 = time.monotonic()
        batch = store.create_batch(
            "pi",
            inputs,
            replicas=replicas,
            quorum=quorum,
            cpu_seconds=300,
            wall_seconds=600,
            memory_bytes=256 << 20,
            output_bytes=1 << 12,
        )
        progress, progress_at = -1, t0
        while not (status := store.batch_status(batch)).finished:
            now = time.monotonic()
            if status.done + status.failed != progress:
                progress, progress_at = status.done + status.failed, now
            if now - progress_at > STALL_SECONDS or now - t0 > BATCH_TIMEOUT:
                raise TimeoutError(
                    f"batch stalled at {progress}/{status.total} jobs:\n" + log_tail(dep.home)
                )
            if any(p.poll() is not None for p in dep.agents):
                raise RuntimeError("an agent exited:\n" + log_tail(dep.home))
            time.sleep(0.02)
        wall = time.monotonic() - t0
        # Let the agents finish their post-result bookkeeping before reading their CPU.
        time.sleep(0.3)
        cpu1 = sum(tree_cpu_seconds(p.pid) for p in dep.agents)
        inside = counted = 0
        job_cpu_ms = results = 0
        for rec in store.iter_results(batch):
            for r in store.list_results(rec.job_id):
                job_cpu_ms += r.cpu_ms
                results += 1
            if rec.result is not None and rec.result.status == "ok":
                with store.open_output(rec.job_id, rec.result.attempt) as out:
                    answer = json.loads(out.read(0, out.size))
                inside += int(answer["inside"])
                counted += int(answer["points"])
    finally:
        store.close()
    if status.failed or counted != per_job * jobs:
        raise RuntimeError(f"batch {batch}: {status.failed} failed jobs, {counted:,} points back")
    estimate = 4 * inside / counted
    sigma = 4 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / counted)
    return {
        "replicas": replicas,
        "quorum": quorum,
        "points": counted,
        "results": results,
        "wall_s": wall,
        "agent_cpu_s": cpu1 - cpu0,
        "job_cpu_s": job_cpu_ms / 1000,
        "estimate": estimate,
        "error_sigmas": abs(estimate - math.pi) / sigma,
        "disagreements": status.disagreements,
    }


def run(quick: bool, reps: int | None) -> dict[str, Any]:
    reps = reps or 3
    jobs = 4 if quick else 20
    base_points = 10**8 if quick else 10**9
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in CONFIGS}
    work = Path(tempfile.mkdtemp(prefix="vcomp-eff-"))
    try:
        with deployment(work) as dep:
            points = base_points // dep.scale
            wait_for_agents(dep)
            # Warm-up: both agents connected, sandbox and page cache warm.
            run_batch(dep, points // 10, 2, 1, 1, 10_000)
            for rep in range(reps):
                order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
                for name, replicas, quorum in order:
                    samples[name].append(
                        run_batch(dep, points, jobs, replicas, quorum, 1 + rep * jobs)
                    )
            program, kind = dep.program, dep.kind
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, replicas, quorum in CONFIGS:
        runs = samples[name]
        agent_cpu = median([r["agent_cpu_s"] for r in runs])
        job_cpu = median([r["job_cpu_s"] for r in runs])
        rows.append(
            {
                "name": name,
                "replicas": replicas,
                "quorum": quorum,
                "points": points,
                "jobs": jobs,
                "reps": len(runs),
                "wall_s": median([r["wall_s"] for r in runs]),
                "agent_cpu_s": agent_cpu,
                "job_cpu_s": job_cpu,
                "points_per_agent_cpu_s": points / agent_cpu if agent_cpu else math.nan,
                "points_per_job_cpu_s": points / job_cpu if job_cpu else math.nan,
                "max_error_sigmas": max(r["error_sigmas"] for r in runs),
                "samples": runs,
            }
        )
    one, two = rows
    ratios = {
        "useful_work_per_cpu_s": one["points_per_agent_cpu_s"] / two["points_per_agent_cpu_s"],
        "useful_work_per_job_cpu_s": one["points_per_job_cpu_s"] / two["points_per_job_cpu_s"],
        "wall": two["wall_s"] / one["wall_s"],
    }
    return {"program": program, "kind": kind, "rows": rows, "ratios": ratios, "goals": []}


def report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print_table(
        f"Efficiency against redundant computing ({result['program']}, {result['kind']}, "
        f"{rows[0]['points']:.0e} points in {rows[0]['jobs']} jobs, median of {rows[0]['reps']})",
        [
            "configuration",
            "wall s",
            "agent CPU s",
            "job CPU s",
            "points / agent CPU-s",
            "points / job CPU-s",
            "max |err| sigma",
        ],
        [
            [
                r["name"],
                r["wall_s"],
                r["agent_cpu_s"],
                r["job_cpu_s"],
                r["points_per_agent_cpu_s"],
                r["points_per_job_cpu_s"],
                r["max_error_sigmas"],
            ]
            for r in rows
        ],
        [
            "ratio attested / 2-of-2: useful work per agent CPU-s "
            f"{result['ratios']['useful_work_per_cpu_s']:.2f}x, per job CPU-s "
            f"{result['ratios']['useful_work_per_job_cpu_s']:.2f}x; wall time 2-of-2 / attested "
            f"{result['ratios']['wall']:.2f}x"
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, help="repetitions per configuration (default 3)")
    args = parser.parse_args(argv)
    result = run(args.quick, args.reps)
    report(result)
    if args.json:
        write_json(args.json, {"benchmark": "efficiency", "quick": args.quick, **result})


if __name__ == "__main__":
    main()
