"""``make demo``: one organisation server and two volunteer agents on loopback.

Everything runs through the real console scripts, as separate processes, in a
temporary directory: init, enrol, allow the agents' measurement, register the
Monte-Carlo π job, serve, join, submit, wait (with its progress bar), collect
the results, then stop everything with SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "server" / "examples"
BIN = Path(sys.executable).parent
JOBS = 20


def _script(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


SERVER = _script("vcomp-server")
AGENT = _script("vcomp-agent")


def run(*args: str, capture: bool = True) -> str:
    proc = subprocess.run(args, capture_output=capture, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip() if capture else ""
        raise SystemExit(f"demo: {' '.join(args[:2])} failed ({proc.returncode}): {detail}")
    return proc.stdout if capture else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            print(log.read_text()[-3000:])
            raise SystemExit(f"demo: {what} did not start")
        time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM every process still running (newest first); their exit codes."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in reversed(procs):
        try:
            codes.append(p.wait(timeout=20))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def build_job(work: Path) -> tuple[Path, str, int]:
    """pi.c compiled natively if a C compiler exists (the paper's binary code), else pi.py."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        exe = work / "pi"
        proc = subprocess.run(
            [cc, "-O2", "-o", str(exe), str(EXAMPLES / "pi.c")], capture_output=True, check=False
        )
        if proc.returncode == 0:
            return exe, "exec", 10**9
    return EXAMPLES / "pi.py", "python", 10**8


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))


def median_ms(lines: list[str], event: str, key: str) -> str:
    values = [
        int(f[key])
        for f in map(fields, lines)
        if f.get("event") == event and f.get(key, "").isdigit()
    ]
    return f"{statistics.median(values):8.0f} ms" if values else "     n/a"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vcomp-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    logs: dict[str, Path] = {}
    try:
        print(f"demo directory: {work}")
        port = free_port()
        srv = work / "server"
        run(SERVER, "init", str(srv))
        toml = srv / "server.toml"
        toml.write_text(re.sub(r"(?m)^bind = .*$", f'bind = "127.0.0.1:{port}"', toml.read_text()))
        agents = [work / f"agent{i}" for i in (1, 2)]
        for home in agents:
            run(
                AGENT,
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
                for ln in run(AGENT, "enrolment", "--config", str(home)).splitlines()
                if ln.startswith("vcomp-enrol/")
            )
            run(SERVER, "enroll", "--config", str(srv), line)
        measurement = run(AGENT, "measure", "--config", str(agents[0])).strip()
        run(SERVER, "allow-measurement", "--config", str(srv), measurement)
        program, kind, total_points = build_job(work)
        run(SERVER, "app", "add", "--config", str(srv), "pi", str(program), "--kind", kind)
        per_job = total_points // JOBS
        inputs = work / "inputs.jsonl"
        inputs.write_text(
            "".join(json.dumps({"points": per_job, "seed": i + 1}) + "\n" for i in range(JOBS))
        )
        print(f"job: Monte-Carlo pi, {kind} ({program.name}), {JOBS} jobs x {per_job:,} points")

        logs["server"] = work / "server.log"
        serve = [SERVER, "serve", "--config", str(srv), "--http-bind", "127.0.0.1:0"]
        procs.append(start(serve, logs["server"]))
        wait_for(logs["server"], "event=server_started", procs[0], "the server")
        for home in agents:
            logs[home.name] = work / f"{home.name}.log"
            # Full mode: two agents on one machine would each see the other's job as
            # the owner's load and keep suspending in background mode.
            procs.append(
                start([AGENT, "join", "--config", str(home), "--mode", "full"], logs[home.name])
            )
        started = time.monotonic()
        batch = run(
            SERVER,
            "submit",
            "--config",
            str(srv),
            "pi",
            "--inputs",
            str(inputs),
            "--cpu-seconds",
            "120",
            "--wall-seconds",
            "300",
        ).strip()
        proc = subprocess.run(
            [SERVER, "wait", "--config", str(srv), batch, "--timeout", "600"], check=False
        )
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            print(f"demo: the batch did not finish cleanly (wait exit {proc.returncode})")
            for name, path in logs.items():
                print(f"--- last lines of {name} log ---")
                print("\n".join(path.read_text().splitlines()[-15:]))
            return 1

        inside = points = 0
        for row in map(
            json.loads, run(SERVER, "results", "--config", str(srv), batch).splitlines()
        ):
            out = json.loads(row["output"])
            inside += int(out["inside"])
            points += int(out["points"])
        estimate = 4 * inside / points
        sigma = 4 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / points)
        server_log = logs["server"].read_text().splitlines()
        agent_log = [
            ln for name in ("agent1", "agent2") for ln in logs[name].read_text().splitlines()
        ]
        print()
        n_points = f"{points:,}"
        rows = [
            ("pi estimate", f"{estimate:.8f}"),
            ("error", f"{estimate - math.pi:+.2e}  (1 sigma for {n_points} points: {sigma:.1e})"),
            (
                "points/second",
                f"{points / elapsed:,.0f}  ({n_points} in {elapsed:.2f} s, 2 agents)",
            ),
        ]
        for name, value in rows:
            print(f"{name:<16} {value}")
        print("median per job:")
        phases = [
            (
                "handshake",
                agent_log,
                "session_established",
                "handshake_ms",
                "HELLO .. READY, incl. attestation",
            ),
            (
                "code transfer",
                server_log,
                "job_delivered",
                "transfer_ms",
                "START .. END acknowledged",
            ),
            ("run", agent_log, "job_finished", "wall_ms", "in the sandbox"),
            ("result", agent_log, "result_committed", "result_ms", "RESULT .. durable commit ACK"),
        ]
        for name, lines, event, key, what in phases:
            print(f"  {name:<14} {median_ms(lines, event, key)}  ({what})")
        return 0
    finally:
        codes = stop_all(procs)
        if procs:
            clean = all(c == 0 for c in codes)
            print(f"stopped server and agents ({'cleanly' if clean else f'exit codes {codes}'})")
        if os.environ.get("VCOMP_DEMO_KEEP"):
            print(f"kept {work} (VCOMP_DEMO_KEEP set)")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
