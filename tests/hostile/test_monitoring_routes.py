"""Hostile clients of /metrics and the dashboard, and hostile text on its way to the page.

Judged by what the attacker got (bytes of data in the answers) and what changed on the
server (rows in the store), over real TCP against a real in-process server.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.hostile.harness import add_batch
from tests.server.http.conftest import Api, start_api
from vcomp.server.http.dashboard import STATIC
from vcomp.server.http.settings import HttpSettings
from vcomp.server.store import ResultSubmission

HOSTILE_ERROR = "</td><img src=x onerror=alert(1)><script>alert(2)</script>\u202e"
# Ways a script turns a string into markup or code.
SINKS = (
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function"
    r"|setAttribute\(\"on"
)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    running = await start_api(tmp_path, HttpSettings(bind="127.0.0.1:0"))
    try:
        yield running
    finally:
        await running.http.close()
        await running.listener.stop()
        await running.org.server.stop()


def _row_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}


async def test_a_flood_without_a_good_token_reads_nothing_and_changes_nothing(api: Api) -> None:
    store = api.org.store
    add_batch(store, 3)
    (agent,) = store.list_agents()
    before = _row_counts(api.org.server.config.store_path)
    headers = [{}, {"Authorization": "Bearer vct_" + "A" * 43}, {"Authorization": "Basic eDp5"}]
    headers.append({"Authorization": "Bearer vct_" + "x" * 4000})  # oversized token

    async def one(i: int) -> tuple[int, bytes]:
        path = ("/metrics", "/api/v1/dashboard")[i % 2]
        async with api.http.get(api.url + path, headers=headers[i % len(headers)]) as r:
            return r.status, await r.read()

    answers = await asyncio.gather(*(one(i) for i in range(300)))
    for status, body in answers:
        assert status in (400, 401), (status, body[:200])
        assert b"vcomp_" not in body and agent.agent_id.encode() not in body
        assert json.loads(body)["error"] in ("missing_token", "bad_token", "bad_request")
    assert _row_counts(api.org.server.config.store_path) == before
    async with api.http.get(api.url + "/metrics", headers=api.auth("read")) as r:
        assert r.status == 200  # and the server still answers the operator


async def test_hostile_error_text_reaches_the_page_as_data_only(api: Api) -> None:
    """The snapshot carries an agent's error text verbatim as a JSON string; the page's
    script has no way to turn a string into markup (no innerHTML, no eval)."""
    store = api.org.store
    add_batch(store, 1, max_attempts=1)
    (agent,) = store.list_agents()
    lease = store.lease_next(agent.agent_id, 0.0, 30.0)
    assert lease is not None
    store.record_results(
        [ResultSubmission(lease.job_id, 1, agent.agent_id, "crashed", error=HOSTILE_ERROR)]
    )
    async with api.http.get(api.url + "/api/v1/dashboard", headers=api.auth("read")) as r:
        assert r.content_type == "application/json"
        (failure,) = (await r.json())["failures"]
    assert HOSTILE_ERROR in failure["reason"]  # kept as text, not cleaned into something else
    script = (STATIC / "dashboard.js").read_text()
    assert not re.search(SINKS, script)
