"""The Python client (vcomp.client) against a real `vcomp-server serve` with its HTTP API.

A real server subprocess (UDP for agents, HTTP for the client), two real agents
running jobs in their sandboxes, and the client speaking only HTTP. Outcomes are
judged by what the server stored (attempts, results), not only by what the client
was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    PI_PY,
    SERVER_CLI,
    AgentHandle,
    Lab,
    Process,
    free_udp_port,
    python_job,
    run_cli,
)
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.client import ApiUnreachable, Client, JobFailed, connect_sync
from vcomp.server.config import STORE_FILE, init_server_home
from vcomp.server.store import JobState
from vcomp.server.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[2]
POINTS = 200_000


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiLab:
    home: Path
    url: str
    admin: str  # tokens
    submit: str
    agents: list[AgentHandle]
    serve: Process

    def store(self) -> SqliteStore:
        return SqliteStore(self.home / STORE_FILE)


def add_app_cli(api: ApiLab, name: str, code: Path) -> None:
    home = str(api.home)
    run_cli([SERVER_CLI, "app", "add", name, str(code), "--kind", "python", "--config", home])


def create_token(home: Path, name: str, scope: str) -> str:
    out = run_cli([SERVER_CLI, "token", "create", name, "--scope", scope, "--config", str(home)])
    return out.stdout.split()[-1]


async def start_api_lab(
    lab: Lab, *, agents: int = 2, lease_seconds: float = 300.0, idle_timeout: float = 60.0
) -> ApiLab:
    """A server home with the HTTP API on, two enrolled agents; serve and the agents running."""
    home = lab.root / "srv"
    fingerprint = init_server_home(home)
    udp, http = free_udp_port(), free_tcp_port()
    toml = (home / "server.toml").read_text().replace("127.0.0.1:7461", f"127.0.0.1:{udp}")
    toml = toml.replace("lease_seconds = 300.0", f"lease_seconds = {lease_seconds}")
    toml = toml.replace("idle_timeout = 60.0", f"idle_timeout = {idle_timeout}")
    (home / "server.toml").write_text(toml)
    homes = [lab.agent_home(f"agent{i}", ("127.0.0.1", udp), fingerprint) for i in range(agents)]
    with SqliteStore(home / STORE_FILE) as store:
        for a in homes:
            e = parse_enrolment(format_enrolment(SimulatedTpm.open(a.tpm_dir), a.name))
            store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
            store.allow_measurement(golden_measurement(a.policy()).format())
    admin = create_token(home, "admin", "admin")
    submit = create_token(home, "scientist", "submit")
    serve, _ = await lab.serve(home, "serve", http_bind=f"127.0.0.1:{http}")
    url = f"http://127.0.0.1:{http}"
    await wait_for_api(url, admin)
    handles = [await lab.run_agent(a) for a in homes]
    return ApiLab(home, url, admin, submit, handles, serve)


async def wait_for_api(url: str, token: str) -> None:
    async with Client.connect(url, token=token) as client:
        for _ in range(300):
            try:
                await client.apps()
                return
            except ApiUnreachable:
                await asyncio.sleep(0.1)
    raise AssertionError(f"the HTTP API at {url} never answered")


def pi_estimate(counts: list[dict[str, int]]) -> tuple[float, float]:
    inside = sum(c["inside"] for c in counts)
    points = sum(c["points"] for c in counts)
    sigma = 4 * math.sqrt(math.pi / 4 * (1 - math.pi / 4) / points)
    return 4 * inside / points, sigma


@pytest.mark.slow
async def test_map_as_completed_gather_of_20_pi_jobs(lab: Lab) -> None:
    api = await start_api_lab(lab)
    add_app_cli(api, "pi", PI_PY)
    async with Client.connect(api.url, token=api.admin) as admin:
        apps = await admin.apps()
    assert [(a.name, a.version, a.kind) for a in apps] == [("pi", 1, "python")]

    inputs = [{"points": POINTS, "seed": 100 + i} for i in range(20)]
    async with Client.connect(api.url, token=api.submit) as client:
        batch = await client.map("pi", inputs)
        assert batch.jobs == 20
        seen = [job async for job in batch.as_completed()]
        counts = await batch.gather_json()
        agents = await client.agents()

    assert sorted(j.index for j in seen) == list(range(20))  # each job once
    assert all(j.state == "done" and j.error is None for j in seen)
    assert {j.index: j.json() for j in seen} == dict(enumerate(counts))
    assert [c["points"] for c in counts] == [POINTS] * 20  # in input order
    estimate, sigma = pi_estimate(counts)
    assert abs(estimate - math.pi) < 4 * sigma, (estimate, sigma)
    # what the server stored is what the client returned
    with api.store() as store:
        stored = {}
        for rec in store.iter_results(batch.id):
            assert rec.state is JobState.DONE and rec.result is not None
            with store.open_output(rec.job_id, rec.result.attempt) as blob:
                stored[rec.index] = json.loads(blob.read(0, blob.size))
    assert stored == dict(enumerate(counts))
    assert sum(a.jobs_done for a in agents) >= 20


@pytest.mark.slow
async def test_as_completed_survives_the_server_being_killed_and_restarted(lab: Lab) -> None:
    api = await start_api_lab(lab, lease_seconds=5.0, idle_timeout=10.0)
    add_app_cli(api, "pi", PI_PY)
    http_bind = api.url.removeprefix("http://")
    async with Client.connect(api.url, token=api.submit) as client:
        batch = await client.map("pi", [{"points": POINTS, "seed": i} for i in range(20)])
        seen, done_at_kill = [], 20
        async for job in batch.as_completed():
            seen.append(job.index)
            if len(seen) == 3:  # the stream is open: kill the server under it
                api.serve.killpg()
                await api.serve.wait(10)
                with api.store() as store:
                    done_at_kill = store.batch_status(batch.id).done
                await lab.serve(api.home, "serve2", http_bind=http_bind)
    # the rest can only have come through a stream to the restarted server
    assert done_at_kill < 20, "the kill came too late to test anything"
    assert sorted(seen) == list(range(20)), seen  # every job once, none lost
    with api.store() as store:
        assert store.batch_status(batch.id).done == 20


FAILING = python_job(
    """
if json.loads(data)["fail"]:
    raise ValueError("seed 13 is unlucky")
return b"fine"
"""
)


@pytest.mark.slow
async def test_a_failing_job_raises_job_failed_with_its_error_text(lab: Lab) -> None:
    api = await start_api_lab(lab)
    code = lab.root / "failing.py"
    code.write_bytes(FAILING)
    add_app_cli(api, "failing", code)
    async with Client.connect(api.url, token=api.submit) as client:
        batch = await client.map("failing", [{"fail": False}, {"fail": True}, {"fail": False}])
        with pytest.raises(JobFailed) as caught:
            await batch.gather()
        info = await batch.job(1)
    failed = caught.value
    assert failed.index == 1
    assert "seed 13 is unlucky" in str(failed)
    assert "ValueError" in failed.message + failed.stderr_tail
    assert info.state == "failed" and info.attempts
    with api.store() as store:
        job = store.get_job_by_index(batch.id, 1)
    assert job.state is JobState.FAILED


@pytest.mark.slow
async def test_cancel_stops_leasing_the_remaining_jobs(lab: Lab) -> None:
    api = await start_api_lab(lab)
    slow = lab.root / "slow.py"
    slow.write_bytes(python_job("time.sleep(0.5)\nreturn data"))
    async with Client.connect(api.url, token=api.admin) as client:
        app = await client.add_app("slow", slow)  # through the API, as an admin
        assert (app.name, app.version, app.size) == ("slow", 1, slow.stat().st_size)
        batch = await client.map("slow", [str(i).encode() for i in range(40)])
        async with contextlib.aclosing(batch.as_completed()) as results:
            async for _first in results:
                break  # one job done: the agents are busy with the batch
        cancelled = await batch.cancel()
        after_cancel = time.time()
        status = await batch.status()
        # a batch submitted after the cancel completes: the agents went on asking for work
        sentinel = await client.map("slow", [b"s0", b"s1", b"s2", b"s3"])
        assert await sentinel.gather() == [b"s0", b"s1", b"s2", b"s3"]
        final = await batch.status()

    assert cancelled > 0 and status.state == "cancelled"
    assert final.counts["done"] < 40 and final.counts["cancelled"] >= cancelled
    with api.store() as store:
        late = [
            (job.index, a.attempt, a.leased_at - after_cancel)
            for i in range(40)
            for job in [store.get_job_by_index(batch.id, i)]
            for a in store.list_attempts(job.job_id)
            if a.leased_at > after_cancel
        ]
    assert late == [], f"attempts leased after the cancel: {late}"


README_EXAMPLE = re.compile(r"<!-- from-python-example -->\n```python\n(.*?)```", re.S)


@pytest.mark.slow
async def test_the_readme_example_and_the_blocking_client(lab: Lab) -> None:
    api = await start_api_lab(lab)
    add_app_cli(api, "pi", PI_PY)

    def blocking() -> tuple[list[bytes], int]:
        with connect_sync(api.url, token=api.submit) as client:
            batch = client.map("pi", [{"points": 1000, "seed": s} for s in range(3)])
            outputs = batch.gather()
            return outputs, batch.status().counts["done"]

    outputs, done = await asyncio.to_thread(blocking)
    assert [json.loads(o)["points"] for o in outputs] == [1000] * 3 and done == 3

    # the README's "From Python" example, as written, but pointed at this server
    match = README_EXAMPLE.search((REPO / "README.md").read_text())
    assert match is not None, "README.md lost its From Python example"
    script = match.group(1).replace("http://127.0.0.1:7462", api.url)
    env = {**os.environ, "VCOMP_TOKEN": api.submit}
    done_proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done_proc.returncode == 0, done_proc.stderr
    estimate = float(done_proc.stdout.split()[-1])
    assert abs(estimate - math.pi) < 0.01, done_proc.stdout
