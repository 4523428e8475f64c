"""The dashboard's routes over real TCP: the snapshot's figures against what really
ran (a real protocol agent and the store), its auth, and the static files' bounds."""

from __future__ import annotations

from pathlib import Path

from tests.hostile.harness import add_batch, until
from tests.server.http.conftest import Api, start_api
from tests.server.http.test_api import submit
from vcomp.server.http.settings import HttpSettings
from vcomp.server.store import ResultSubmission

DASHBOARD = "/api/v1/dashboard"


async def snapshot(api: Api, headers: dict[str, str]) -> dict:  # type: ignore[type-arg]
    async with api.http.get(api.url + DASHBOARD, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_the_snapshot_follows_a_batch_from_open_to_done(api: Api) -> None:
    read = api.auth("read")
    batch = await submit(api, 5)
    before = await snapshot(api, read)
    (open_batch,) = before["batches"]
    counts = open_batch["counts"]
    assert (open_batch["batch"], open_batch["jobs"], counts["queued"]) == (batch, 5, 5)
    assert sum(before["throughput"]["results"]) == 0
    assert len(before["throughput"]["results"]) * before["throughput"]["slot_seconds"] == 900

    agent = api.org.agent()
    await agent.start()
    try:
        await until(lambda: api.org.store.batch_status(batch).finished, 30, "the batch")
        after = await snapshot(api, read)
    finally:
        await agent.stop()
    assert after["batches"] == []  # finished: no longer open
    assert sum(after["throughput"]["results"]) == 5  # as many as the store holds done
    assert api.org.store.batch_status(batch).done == 5
    (entry,) = after["agents"]
    assert entry["jobs_done"] == 5 and entry["cpu_seconds"] >= 0
    assert after["agents_enrolled"] == 1 and after["failures"] == []


async def test_a_failed_job_shows_with_its_reason(api: Api) -> None:
    store = api.org.store
    batch = add_batch(store, 1, max_attempts=1)
    (agent,) = store.list_agents()
    lease = store.lease_next(agent.agent_id, 0.0, 30.0)
    assert lease is not None
    store.record_results(
        [ResultSubmission(lease.job_id, lease.attempt, agent.agent_id, "crashed", error="x" * 5000)]
    )
    (failure,) = (await snapshot(api, api.auth("read")))["failures"]
    assert (failure["batch"], failure["index"], failure["job"]) == (batch, 0, lease.job_id)
    assert "crashed" in failure["reason"] and "xxxx" in failure["reason"]
    assert len(failure["reason"]) == 500  # clipped: the job's own page has all of it


async def test_the_snapshot_needs_a_read_token(api: Api) -> None:
    async with api.http.get(api.url + DASHBOARD) as r:
        assert (r.status, (await r.json())["error"]) == (401, "missing_token")
    async with api.http.get(api.url + DASHBOARD, headers={"Authorization": "Bearer x"}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "bad_token")
    for scope in ("read", "submit", "admin"):
        assert "agents" in await snapshot(api, api.auth(scope))


async def test_open_metrics_on_loopback_opens_the_snapshot_too(tmp_path: Path) -> None:
    api = await start_api(tmp_path, HttpSettings(bind="127.0.0.1:0", open_metrics=True))
    try:
        assert "batches" in await snapshot(api, {})
    finally:
        await api.http.close()
        await api.listener.stop()
        await api.org.server.stop()


async def test_the_page_and_its_files_are_served_with_a_strict_policy(api: Api) -> None:
    async with api.http.get(api.url + "/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
        policy = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere (no CDN)
    for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        async with api.http.get(f"{api.url}/static/{name}") as r:
            assert (r.status, r.content_type) == (200, ctype)
            assert "innerHTML" not in await r.text()


async def test_no_path_leads_out_of_the_static_files(api: Api) -> None:
    secret = api.org.server.config.key_path.read_bytes()
    for path in (
        "/static/..%2fserver.toml",
        "/static/%2e%2e/%2e%2e/server.toml",
        "/static/../../../etc/passwd",
        "/static/index.html",
        "/static/nope.js",
        "/static/",
    ):
        async with api.http.get(api.url + path) as r:
            body = await r.read()
        assert r.status == 404, path
        assert secret not in body and b"root:" not in body
