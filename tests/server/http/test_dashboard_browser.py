"""The dashboard in a real browser: Debian's headless Chromium against a real server.

A real in-process server with its HTTP listener, two real sandboxed agents (one of
them enrolled under a name that is an HTML/JS injection attempt) and a batch in
flight: three jobs done, one failed with an error text that is another injection
attempt, two running (they sleep) and one queued. Chromium loads the page with a read
token in the URL's fragment, runs its script (``--virtual-time-budget``) and dumps
the DOM; the test reads the batch's progress, the online agents and the failure
from it, and checks that neither hostile string became markup or ran.

Why ``chromium --headless --dump-dom`` and no driver library: it is Chromium's own
interface, needs nothing from PyPI (Selenium or Playwright would want a matching
chromedriver or their own browser build, which an offline machine lacks), and what
it prints is exactly the DOM after the page's script ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import Lab, python_job, wait_until
from tests.server.http.conftest import Api
from tests.server.http.test_api import submit
from vcomp.agent.tpm import SimulatedTpm
from vcomp.server.http.app import HttpListener
from vcomp.server.http.auth import new_token, token_digest
from vcomp.server.http.settings import HttpSettings
from vcomp.server.store.records import CONNECTED_SECONDS

CHROMIUM = shutil.which("chromium")
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned-by-name'\">"
HOSTILE_ERROR = "<script>document.title='pwned-by-error'</script><b id=injected>boom</b>"
# A job per input: finish at once, fail with HOSTILE_ERROR, or sleep (stays in flight).
JOB = python_job(
    """
job = json.loads(data)
if job["do"] == "fail":
    raise RuntimeError(job["text"])
time.sleep(job["sleep"])
return b"ok"
"""
)
INPUTS = [
    *(json.dumps({"do": "run", "sleep": 0}).encode() for _ in range(3)),
    json.dumps({"do": "fail", "text": HOSTILE_ERROR}).encode(),
    *(json.dumps({"do": "run", "sleep": 600}).encode() for _ in range(3)),
]


@dataclass
class Scene:
    url: str  # the page, with a read token in its fragment
    batch: int
    agent_names: list[str]


@contextlib.asynccontextmanager
async def dashboard_scene(root: Path, *, history: int = 0) -> AsyncIterator[Scene]:
    """A server with a batch in flight and two online agents, its dashboard's URL.

    ``history`` quick jobs run to the end first (a finished batch), for a graph with
    something in it (the screenshot script)."""
    lab = Lab(root)
    try:
        org = lab.org()
        await lab.start(org)
        token = new_token()
        org.store.create_token("dashboard", "read", token_digest(token))
        listener = HttpListener(org.server, HttpSettings(bind="127.0.0.1:0"))
        await listener.start()
        lab.on_close(listener.stop)
        configs = [lab.agent_config(org, "alice")]
        hostile = lab.agent_config(org, "agent2", enroll=False)
        org.enroll(SimulatedTpm.open(hostile.tpm_dir), HOSTILE_NAME)
        configs.append(hostile)
        agents = [await lab.run_agent(c, org) for c in configs]
        await wait_until(lambda: all(a.connected_sessions for a in agents), "2 agents connected")
        org.add_app("sleepy", JOB)
        if history:
            quick = [json.dumps({"do": "run", "sleep": 0}).encode()] * history
            await org.wait_batch(org.submit("sleepy", quick), timeout=600)
        batch = org.submit("sleepy", INPUTS, wall_seconds=900, max_attempts=1)

        def in_flight() -> bool:
            s = org.store.batch_status(batch)
            return (s.done, s.failed, s.leased, s.queued) == (3, 1, 2, 1)

        await wait_until(in_flight, "3 done, 1 failed, 2 running, 1 queued", timeout=120)

        def both_seen() -> bool:
            seen = [a.last_seen for a in org.store.list_agents()]
            now = time.time()
            return all(s is not None and now - s < CONNECTED_SECONDS / 2 for s in seen)

        await wait_until(both_seen, "both agents' heartbeat in the store", timeout=30)
        names = sorted(a.name for a in org.store.list_agents())
        assert names[0].startswith("<img") and "onerror=" in names[0]  # stored as hostile
        yield Scene(f"{listener.url}/#token={token}", batch, names)
    finally:
        await lab.close()


async def chromium(root: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on ``url`` until its virtual time runs out; its stdout."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # we are root in a container; the page is our own
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={root / 'chromium-profile'}",
        "--virtual-time-budget=6000",  # the script's first poll and a second one
        *extra,
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 180)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def row(dom: str, attribute: str, value: str) -> str:
    """The <tr> whose data attribute ``attribute`` is ``value``."""
    found = re.search(rf'<tr data-{attribute}="{re.escape(value)}">(.*?)</tr>', dom, re.S)
    assert found, f"no row {attribute}={value} in the DOM"
    return found.group(1)


@pytest.mark.skipif(
    CHROMIUM is None or not sys.platform.startswith("linux"),
    reason="Debian's chromium is not installed (.ci/run installs it)",
)
async def test_the_dashboard_shows_the_batch_in_flight_and_the_online_agents(
    tmp_path: Path,
) -> None:
    async with dashboard_scene(tmp_path) as scene:
        dom = await chromium(tmp_path, scene.url, "--dump-dom")

    # The batch in flight: 4 of 7 jobs final (3 done, 1 failed), as the store said.
    batch = row(dom, "batch", str(scene.batch))
    assert 'max="7"' in batch and 'value="4"' in batch, batch
    assert "4/7 (57%)" in batch
    numbers = re.findall(r'<td class="num">(\d+)</td>', batch)
    assert numbers == [str(scene.batch), "3", "1", "2", "1"]  # id, done, failed, leased, queued

    # Both agents online, each a row in the table.
    assert re.search(r'<b id="agents-online">2</b>', dom)
    assert dom.count('<td class="online">online</td>') == 2
    for name in scene.agent_names:
        assert f'<td class="name">{html.escape(name, quote=False)}</td>' in dom

    # The failure and its reason, as text.
    assert html.escape(HOSTILE_ERROR, quote=False) in dom

    # Neither hostile string became markup, and nothing of theirs ran.
    assert "<title>vcomp dashboard</title>" in dom
    assert "pwned" not in re.sub(r"&lt;.*?&gt;", "", dom.split("<body>")[0])
    assert "<img" not in dom and 'id="injected"' not in dom and "<script>document" not in dom
    assert 'class="state">updated' in dom  # the script ran and drew a snapshot


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_the_dashboard_says_why_it_cannot_load_without_a_token(
    api: Api, tmp_path: Path
) -> None:
    await submit(api, 2)  # data the page must not show without a token
    dom = await chromium(tmp_path, f"{api.url}/", "--dump-dom")
    assert 'class="state error">cannot load: a read token is needed' in dom
    assert "data-batch=" not in dom
