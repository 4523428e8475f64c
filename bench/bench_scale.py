"""Scale: server memory per idle session, and server CPU while the sessions sit idle.

    python bench/bench_scale.py [--quick] [--json PATH] [--idle SECONDS]

The server (a real :class:`OrganisationServer`, uvloop, its own spawned process) gets
attested sessions from :class:`LiteAgent` processes (the real protocol over real UDP;
no sandbox; up to 5,000 agents and UDP sockets per process, RLIMIT_NOFILE raised).
Agent-side shortcuts, which cost the server nothing: each agent process shares one
enrolled simulated TPM, and its agents reuse a pool of 4 pre-generated ephemeral RSA
keys (generating 10,000 RSA-2048 keys would take minutes).

Memory: the server's RSS (VmRSS, after gc.collect()) once it holds a few warm-up
sessions, then with 1,000 and (full run) 10,000 established idle sessions; per session
= the growth divided by the sessions added. Goal: <= 20 KiB per session.
CPU: the server process's CPU over ``--idle`` seconds (default 16 quick, 30 full: more
than the 15 s keepalive interval, so every session's PING/PONG is counted) with all
sessions idle, as % of one core.
Where the memory goes: a final step starts tracemalloc in the server, adds a few
hundred more sessions and lists the allocation sites that grew, per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import sys
import time
import tracemalloc
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
    close_all,
    ephemeral_pool,
    install_uvloop,
    open_agent_tpm,
    print_table,
    process_cpu_seconds,
    serve_commands,
    write_json,
)

from vcomp.loadgen import LiteAgent

KIB = 1024
GOAL_KIB = 20.0
WARMUP_SESSIONS = 20
PER_PROCESS = 5_000
IN_FLIGHT = 64  # handshakes in flight per agent process
TRACE_SESSIONS = 300
CONNECT_TIMEOUT = 600.0
VM_RSS = "VmRSS:"


def repo_relative(site: str) -> str:
    """``/abs/path/src/vcomp/x.py:12`` -> ``src/vcomp/x.py:12`` (stable across checkouts)."""
    marker = "/src/vcomp/"
    return site[site.index(marker) + 1 :] if marker in site else site


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(VM_RSS):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no VmRSS in /proc status")


# ---------------------------------------------------------------------- server process

_server_state: dict[str, Any] = {}


async def server_handle(command: tuple[Any, ...]) -> Any:
    kind, *args = command
    if kind == "start":
        (agent_tpms,) = args
        stack = contextlib.AsyncExitStack()
        bench = await stack.enter_async_context(
            bench_server(agent_tpms=agent_tpms, max_sessions=100_000, idle_timeout=120.0)
        )
        _server_state.update(stack=stack, bench=bench)
        return bench.identities
    bench = _server_state["bench"]
    endpoint = bench.server.endpoint
    if kind == "rss":
        await asyncio.sleep(1.0)  # let the committer finish the session bookkeeping
        gc.collect()
        ready = sum(1 for s in endpoint.sessions.values() if s.channel is not None)
        return {"rss": rss_bytes(), "sessions": len(endpoint.sessions), "ready": ready}
    if kind == "trace_start":
        tracemalloc.start(4)
        gc.collect()
        _server_state["snapshot"] = tracemalloc.take_snapshot()
        return tracemalloc.get_traced_memory()[0]
    if kind == "trace_top":
        (limit,) = args
        await asyncio.sleep(1.0)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.compare_to(_server_state["snapshot"], "lineno")
        tracemalloc.stop()
        top = [
            {
                "site": repo_relative(str(s.traceback[0])),
                "bytes": s.size_diff,
                "blocks": s.count_diff,
            }
            for s in stats[:limit]
        ]
        return {"traced": traced, "top": top}
    if kind == "stop":
        await _server_state["stack"].aclose()
        return True
    raise ValueError(f"unknown command {kind!r}")


def server_main(conn: Connection) -> None:
    serve_commands(conn, server_handle)


# ---------------------------------------------------------------------- agent processes

_agents: list[LiteAgent] = []


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def agent_handle(command: tuple[Any, ...]) -> Any:
    kind, *args = command
    if kind == "join":
        identity, count = args
        identity = AgentIdentity(*identity) if isinstance(identity, tuple) else identity
        raise_nofile(len(_agents) + count + 256)
        tpm = open_agent_tpm(identity.tpm_dir)
        pool = _server_pool()
        gate = asyncio.Semaphore(IN_FLIGHT)
        failed: list[str] = []

        async def one(i: int) -> None:
            async with gate:
                agent = LiteAgent(
                    tpm=tpm,
                    pinned=identity.pinned,
                    server=identity.server,
                    ephemeral=pool[i % len(pool)],
                )
                _agents.append(agent)
                await agent.start()
                try:
                    await asyncio.wait_for(agent.connected.wait(), 60.0)
                except TimeoutError:
                    failed.append(
                        (agent.stats.rejected or agent.stats.closed or ["no READY in 60 s"])[0]
                    )

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(count)))
        return {
            "joined": count - len(failed),
            "failed": failed[:5],
            "seconds": time.monotonic() - t0,
        }
    if kind == "stop":
        await asyncio.gather(*(a.stop() for a in _agents), return_exceptions=True)
        _agents.clear()
        return True
    raise ValueError(f"unknown command {kind!r}")


_pool: list[Any] = []


def _server_pool() -> list[Any]:
    if not _pool:
        _pool.extend(ephemeral_pool(4))
    return _pool


def agent_main(conn: Connection) -> None:
    serve_commands(conn, agent_handle)


# ---------------------------------------------------------------------- the run


async def add_sessions(
    workers: list[Worker], identities: list[AgentIdentity], total: int
) -> dict[str, Any]:
    """Spread ``total`` new sessions over the agent processes, PER_PROCESS at most each."""
    shares = [total // len(workers)] * len(workers)
    shares[0] += total - sum(shares)
    replies = await asyncio.gather(
        *(
            w.ask(("join", identities[i], n), CONNECT_TIMEOUT)
            for i, (w, n) in enumerate(zip(workers, shares, strict=True))
            if n
        )
    )
    return {
        "joined": sum(r["joined"] for r in replies),
        "failed": [f for r in replies for f in r["failed"]],
        "seconds": max(r["seconds"] for r in replies),
    }


async def run(quick: bool, idle_seconds: float | None) -> dict[str, Any]:
    levels = [1_000] if quick else [1_000, 10_000]
    idle = idle_seconds or (16.0 if quick else 30.0)
    processes = max(1, -(-levels[-1] // PER_PROCESS))
    server = Worker(server_main)
    agents = [Worker(agent_main) for _ in range(processes)]
    rows: list[dict[str, Any]] = []
    trace: dict[str, Any] = {}
    try:
        identities = await server.ask(("start", processes))
        await add_sessions(agents[:1], identities, WARMUP_SESSIONS)
        base = await server.ask(("rss",))
        established = WARMUP_SESSIONS
        for level in levels:
            joined = await add_sessions(agents, identities, level - (established - WARMUP_SESSIONS))
            established += joined["joined"]
            mem = await server.ask(("rss",))
            added = mem["ready"] - base["ready"]
            cpu0, t0 = process_cpu_seconds(server.pid), time.monotonic()
            await asyncio.sleep(idle)
            cpu1, t1 = process_cpu_seconds(server.pid), time.monotonic()
            after = await server.ask(("rss",))
            rows.append(
                {
                    "sessions": level,
                    "ready": mem["ready"],
                    "join_failures": joined["failed"],
                    "join_seconds": joined["seconds"],
                    "handshakes_per_s": joined["joined"] / joined["seconds"],
                    "rss_base": base["rss"],
                    "rss": mem["rss"],
                    "per_session_kib": (mem["rss"] - base["rss"]) / max(1, added) / KIB,
                    "idle_seconds": t1 - t0,
                    "idle_cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
                    "ready_after_idle": after["ready"],
                    "rss_after_idle": after["rss"],
                }
            )
        traced0 = await server.ask(("trace_start",))
        joined = await add_sessions(agents[:1], identities, TRACE_SESSIONS)
        top = await server.ask(("trace_top", 8))
        n = max(1, joined["joined"])
        trace = {
            "sessions": joined["joined"],
            "per_session_kib": (top["traced"] - traced0) / n / KIB,
            "top": [dict(t, per_session=t["bytes"] / n) for t in top["top"]],
        }
    finally:
        for w in agents:
            with contextlib.suppress(Exception):
                await w.ask(("stop",), 60)
        with contextlib.suppress(Exception):
            await server.ask(("stop",), 60)
        await close_all([server, *agents])
    return {"rows": rows, "trace": trace, "goals": goals(rows), "agent_processes": processes}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "goal": f"server memory per idle session at {r['sessions']:,} <= {GOAL_KIB:g} KiB",
            "status": "met" if r["per_session_kib"] <= GOAL_KIB else "missed",
            "value": r["per_session_kib"],
            "target": GOAL_KIB,
        }
        for r in rows
    ]


def report(result: dict[str, Any]) -> None:
    print_table(
        "Server memory and CPU with idle sessions",
        [
            "sessions",
            "ready",
            "handshakes/s",
            "RSS base MiB",
            "RSS MiB",
            "KiB/session",
            "idle CPU %",
            "idle s",
            "ready after idle",
        ],
        [
            [
                r["sessions"],
                r["ready"],
                r["handshakes_per_s"],
                r["rss_base"] / (1 << 20),
                r["rss"] / (1 << 20),
                r["per_session_kib"],
                r["idle_cpu_percent"],
                r["idle_seconds"],
                r["ready_after_idle"],
            ]
            for r in result["rows"]
        ],
        [f"goal: <= {GOAL_KIB:g} KiB per session; {result['agent_processes']} agent processes"],
    )
    trace = result["trace"]
    if trace:
        print_table(
            f"Where it goes: tracemalloc growth over {trace['sessions']} more sessions "
            f"({trace['per_session_kib']:.1f} KiB/session of Python heap)",
            ["allocation site", "bytes/session", "blocks"],
            [[t["site"], t["per_session"], t["blocks"]] for t in trace["top"]],
        )
    print_table(
        "Goals",
        ["goal", "value", "status"],
        [[g["goal"], g["value"], g["status"]] for g in result["goals"]],
    )


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--idle", type=float, help="seconds of idle CPU measurement")
    args = parser.parse_args(argv)
    install_uvloop()
    result = asyncio.run(run(args.quick, args.idle))
    report(result)
    if args.json:
        write_json(args.json, {"benchmark": "scale", "quick": args.quick, **result})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
