"""The console scripts, end to end, as an organisation and a volunteer would run them."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

from tests.integration.conftest import (
    AGENT_CLI,
    PI_PY,
    SERVER_CLI,
    Lab,
    free_udp_port,
    pi_reference,
    run_cli,
    wait_until,
)

POINTS = 200_000


def after(lines: list[str], header: str) -> str:
    """The line that follows ``header`` in a command's output."""
    index = next(i for i, line in enumerate(lines) if line.startswith(header))
    return lines[index + 1].strip()


async def test_console_scripts_end_to_end(lab: Lab, tmp_path: Path) -> None:
    srv, agent_home = tmp_path / "org", tmp_path / "volunteer"
    out = run_cli([SERVER_CLI, "init", str(srv)]).stdout
    fingerprint = next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("fingerprint:"))
    port = free_udp_port()
    toml = srv / "server.toml"
    toml.write_text(toml.read_text().replace("127.0.0.1:7461", f"127.0.0.1:{port}"))
    cfg = ["--config", str(srv)]

    lines = run_cli(
        [
            AGENT_CLI,
            "init",
            str(agent_home),
            "--name",
            "volunteer-1",
            "--server",
            f"127.0.0.1:{port}",
            "--server-key",
            str(srv / "server.pub"),
        ]
    ).stdout.splitlines()
    agent_id = next(ln.split()[-1] for ln in lines if ln.startswith("agent id:"))
    enrolment = after(lines, "enrolment line")
    measurement = after(lines, "golden measurement")
    assert run_cli([AGENT_CLI, "measure", "--config", str(agent_home)]).stdout.strip() == (
        measurement
    )

    assert agent_id in run_cli([SERVER_CLI, "enroll", enrolment, *cfg]).stdout
    run_cli([SERVER_CLI, "allow-measurement", measurement, "--note", "test build", *cfg])
    run_cli([SERVER_CLI, "app", "add", "pi", str(PI_PY), "--kind", "python", *cfg])

    serve, serve_log = lab.spawn([SERVER_CLI, "serve", *cfg, "--http-bind", "127.0.0.1:0"], "serve")
    await wait_until(lambda: f"key {fingerprint}" in serve.stdout, "serve to listen", 30)
    join, join_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(agent_home), "--mode", "full"], "join"
    )

    inputs = [{"points": POINTS, "seed": 7}, {"points": POINTS, "seed": 8}]
    jsonl = tmp_path / "inputs.jsonl"
    jsonl.write_text("".join(json.dumps(i) + "\n" for i in inputs))
    batch = run_cli([SERVER_CLI, "submit", "pi", "--inputs", str(jsonl), *cfg]).stdout.strip()
    assert batch.isdigit()
    waited = run_cli([SERVER_CLI, "wait", batch, "--timeout", "90", "--quiet", *cfg], 120)
    assert "2 done, 0 failed of 2" in waited.stdout

    rows = [
        json.loads(line)
        for line in run_cli([SERVER_CLI, "results", batch, *cfg]).stdout.splitlines()
    ]
    assert [r["index"] for r in rows] == [0, 1]
    inside = 0
    for row, given in zip(rows, inputs, strict=True):
        assert row["state"] == "done" and row["status"] == "ok"
        assert row["agent_id"] == agent_id and row["attempt"] == 1
        assert row["output"].encode() == pi_reference(json.dumps(given).encode())
        inside += json.loads(row["output"])["inside"]
    estimate = 4 * inside / (2 * POINTS)
    sigma = 4 * math.sqrt(math.pi / 4 * (1 - math.pi / 4) / (2 * POINTS))
    assert abs(estimate - math.pi) < 4 * sigma
    assert serve_log.events("result_recorded", outcome="accepted")
    assert join_log.events("result_committed")

    # SIGTERM: both leave cleanly (exit 0) and promptly.
    join.signal(signal.SIGTERM)
    assert await join.wait(20) == 0
    assert join_log.events("agent_stopped")
    serve.signal(signal.SIGTERM)
    assert await serve.wait(20) == 0
    assert serve_log.events("server_stopped")
    # The agent said goodbye, so the server closed its session at once.
    closed = serve_log.events("session_closed")
    assert closed and "agent shutting down" in closed[0]["reason"]
