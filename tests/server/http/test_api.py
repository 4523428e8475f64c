"""The HTTP API against a real in-process server, over real TCP, with real tokens.

Judged by what the store holds and what the server still does afterwards, not only
by the status codes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import time

import pytest

from tests.hostile.harness import APP, until
from tests.server.http.conftest import Api

# (method, path, scope it needs)
ROUTES = [
    ("GET", "/api/v1/apps", "read"),
    ("GET", "/api/v1/batches", "read"),
    ("POST", "/api/v1/batches", "submit"),
    ("GET", "/api/v1/batches/1", "read"),
    ("GET", "/api/v1/batches/1/results", "read"),
    ("GET", "/api/v1/batches/1/jobs/0", "read"),
    ("GET", "/api/v1/agents", "read"),
    ("POST", "/api/v1/batches/1/cancel", "submit"),
    ("POST", "/api/v1/batches/1/retry", "submit"),
    ("POST", "/api/v1/apps/extra/versions?kind=python", "admin"),
    ("POST", "/api/v1/agents/AGENT/revoke", "admin"),
    ("POST", f"/api/v1/apps/{APP}/versions/1/retire", "admin"),
]
BELOW = {"read": None, "submit": "read", "admin": "submit"}


def ndjson(*lines: object) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def submit(api: Api, n: int) -> int:
    body = ndjson({"app": APP, "wall_seconds": 10}, *({"json": {"i": i}} for i in range(n)))
    headers = {**api.auth("submit"), "Content-Type": "application/x-ndjson"}
    async with api.http.post(f"{api.url}/api/v1/batches", data=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        answer = await r.json()
    assert answer["jobs"] == n
    return int(answer["batch"])


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
async def test_every_route_checks_its_scope(api: Api, method: str, path: str, scope: str) -> None:
    await submit(api, 1)  # batch 1 exists, so the right scope gets past the lookup
    (agent,) = api.org.store.list_agents()
    url = api.url + path.replace("AGENT", agent.agent_id)
    async with api.http.request(method, url) as r:
        assert (r.status, (await r.json())["error"]) == (401, "missing_token")
    async with api.http.request(method, url, headers={"Authorization": "Bearer vct_nope"}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "bad_token")
    if BELOW[scope] is not None:
        async with api.http.request(method, url, headers=api.auth(BELOW[scope])) as r:
            assert (r.status, (await r.json())["error"]) == (403, "wrong_scope")
    headers = {**api.auth(scope), "Content-Type": "application/x-ndjson"}
    data = ndjson({"app": APP}, {"json": 1}) if path == "/api/v1/batches" else None
    if "/versions" in path:
        data = b"print('code')\n"
    async with api.http.request(method, url, headers=headers, data=data) as r:
        assert r.status in (200, 201), await r.text()


async def test_a_revoked_token_is_refused_and_tokens_are_stored_hashed(api: Api) -> None:
    async with api.http.get(f"{api.url}/api/v1/apps", headers=api.auth("read")) as r:
        assert r.status == 200
    api.org.store.revoke_token("t-read")
    async with api.http.get(f"{api.url}/api/v1/apps", headers=api.auth("read")) as r:
        assert (r.status, (await r.json())["error"]) == (401, "bad_token")
    raw = (api.org.server.config.store_path).read_bytes()
    for token in api.tokens.values():
        assert token.encode() not in raw


async def test_submit_follow_and_collect_with_a_real_agent(api: Api) -> None:
    batch = await submit(api, 5)
    agent = api.org.agent()
    await agent.start()
    try:
        url = f"{api.url}/api/v1/batches/{batch}/results?follow=true"
        lines = []
        async with api.http.get(url, headers=api.auth("read")) as r:
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            async for raw in r.content:
                if raw.strip():
                    lines.append(json.loads(raw))
        assert sorted(line["index"] for line in lines) == list(range(5))
        for line in lines:
            assert line["state"] == "done" and line["error"] is None
            stored = api.org.store.get_job_by_index(batch, line["index"])
            (result,) = [x for x in api.org.store.list_results(stored.job_id) if x.counted]
            with api.org.store.open_output(stored.job_id, result.attempt) as blob:
                assert base64.b64decode(line["output_b64"]) == blob.read(0, blob.size)
        base, read = f"{api.url}/api/v1/batches/{batch}", api.auth("read")
        async with api.http.get(base, headers=read) as r:
            status = await r.json()
        assert status["state"] == "finished" and status["counts"]["done"] == 5
        async with api.http.get(f"{base}/jobs/2", headers=read) as r:
            job = await r.json()
        assert job["state"] == "done" and job["attempts"][0]["outcome"] == "ok"
        await api.org.server._heartbeat(time.time())  # touch the live sessions now
        await until(lambda: _agent_seen(api), 10, "the agent's touch to be written")
        async with api.http.get(f"{api.url}/api/v1/agents", headers=api.auth("read")) as r:
            (entry,) = (await r.json())["agents"]
        assert entry["connected"] is True and entry["jobs_done"] == 5
    finally:
        await agent.stop()


def _agent_seen(api: Api) -> bool:
    (agent,) = api.org.store.list_agents()
    return agent.last_seen is not None


BAD = [
    ("application/x-ndjson", b'{"app": "hostile-app"\n', 400, "bad_json"),
    ("application/x-ndjson", b"", 400, "bad_request"),
    ("application/x-ndjson", ndjson({"app": "no-such-app"}, {"json": 1}), 404, "unknown_app"),
    ("application/x-ndjson", ndjson({"app": APP, "colour": "red"}), 400, "bad_request"),
    ("application/x-ndjson", ndjson({"app": APP}, {"b64": "***"}), 400, "bad_request"),
    ("application/x-ndjson", ndjson({"app": APP}, {"json": 1, "b64": ""}), 400, "bad_request"),
    ("application/x-ndjson", ndjson({"app": APP}, [1, 2]), 400, "bad_request"),
    ("application/json", b'{"app": "hostile-app", "inputs": 3}', 400, "bad_request"),
    ("application/json", b"{nope", 400, "bad_json"),
    ("text/plain", b"hello", 415, "unsupported_media_type"),
    (
        "application/x-ndjson",
        ndjson({"app": APP, "replicas": "5"}, {"json": 1}),
        400,
        "bad_request",
    ),
    (
        "application/x-ndjson",
        ndjson({"app": APP, "replicas": True}, {"json": 1}),
        400,
        "bad_request",
    ),
    (
        "application/x-ndjson",
        ndjson({"app": APP, "deadline": "x"}, {"json": 1}),
        400,
        "bad_request",
    ),
    ("application/x-ndjson", ndjson({"app": APP, "memory": -1}, {"json": 1}), 400, "bad_request"),
    ("application/json", b'{"app": "hostile-app", "inputs": ' + b"[" * 100_000, 400, "bad_json"),
    (
        "application/json",
        b'{"app": "hostile-app", "inputs": [' + b'{"json": 1},' * 400_000,
        413,
        "too_large",
    ),
]


@pytest.mark.parametrize(("ctype", "body", "status", "code"), BAD)
async def test_bad_batch_requests_get_their_own_error_and_store_nothing(
    api: Api, ctype: str, body: bytes, status: int, code: str
) -> None:
    headers = {**api.auth("submit"), "Content-Type": ctype}
    async with api.http.post(f"{api.url}/api/v1/batches", data=body, headers=headers) as r:
        answer = await r.json()
        assert (r.status, answer["error"]) == (status, code), answer
        assert "Traceback" not in answer["message"]
    assert api.org.store.list_batches() == []
    await submit(api, 1)  # and the server still takes good requests


async def test_an_oversized_body_is_refused_before_it_is_kept(api: Api) -> None:
    """1 MiB limit, 8 MiB streamed: refused, nothing stored, the server serves on."""

    async def body():  # type: ignore[no-untyped-def]
        yield json.dumps({"app": APP}).encode() + b"\n"
        line = json.dumps({"b64": base64.b64encode(bytes(48 << 10)).decode()}).encode() + b"\n"
        for _ in range(128):
            yield line

    headers = {**api.auth("submit"), "Content-Type": "application/x-ndjson"}
    async with api.http.post(f"{api.url}/api/v1/batches", data=body(), headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (413, "too_large")
    assert api.org.store.list_batches() == []
    await asyncio.sleep(0)
    await submit(api, 1)


async def test_unknown_paths_and_methods_are_json_errors(api: Api) -> None:
    async with api.http.get(f"{api.url}/api/v1/nothing") as r:
        assert (r.status, (await r.json())["error"]) == (404, "not_found")
    async with api.http.delete(f"{api.url}/api/v1/apps") as r:
        assert (r.status, (await r.json())["error"]) == (405, "method_not_allowed")
    async with api.http.get(f"{api.url}/api/v1/batches/abc", headers=api.auth("read")) as r:
        assert r.status == 404


def test_the_store_keeps_no_token_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vcomp.server.http.auth import new_token, token_digest
    from vcomp.server.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.sqlite")
    token = new_token()
    store.create_token("x", "admin", token_digest(token))
    store.close()
    rows = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT * FROM api_tokens").fetchall()
    assert token not in repr(rows) and len(rows) == 1


async def test_cancel_over_http_leaves_nothing_for_a_real_agent(api: Api) -> None:
    batch = await submit(api, 6)
    url, headers = f"{api.url}/api/v1/batches/{batch}", api.auth("submit")
    async with api.http.post(f"{url}/cancel", headers=headers) as r:
        assert (r.status, await r.json()) == (200, {"batch": batch, "cancelled": 6})
    agent = api.org.agent()
    await agent.start()
    try:
        later = await submit(api, 1)  # queued behind the cancelled ones: the agent works
        await until(lambda: api.org.store.batch_status(later).done == 1, 30, "the later job")
    finally:
        await agent.stop()
    assert agent.stats.jobs == 1
    for index in range(6):
        job = api.org.store.get_job_by_index(batch, index)
        assert api.org.store.list_attempts(job.job_id) == []
    async with api.http.get(url, headers=headers) as r:
        status = await r.json()
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == 6
    async with api.http.post(f"{api.url}/api/v1/batches/99/cancel", headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (404, "unknown_batch")
    async with api.http.post(f"{url}/retry", headers=headers) as r:
        answer = await r.json()
    assert answer == {"batch": batch, "retry_batch": None, "requeued": 0, "indices": []}


async def test_add_an_app_version_over_http(api: Api) -> None:
    url, admin = f"{api.url}/api/v1/apps/fresh/versions", api.auth("admin")
    code = b"from vcomp.guest import run\nrun(lambda data: data)\n"
    async with api.http.post(f"{url}?kind=python", data=code, headers=admin) as r:
        added = await r.json()
        assert r.status == 201, added
    stored = api.org.store.get_app("fresh")
    assert (added["version"], added["size"], stored.size) == (1, len(code), len(code))
    with api.org.store.open_code(stored.app_id) as blob:
        assert blob.read(0, blob.size) == code
    for query in ("kind=ruby", "kind=python&validator=no.such:fn"):
        async with api.http.post(f"{url}?{query}", data=code, headers=admin) as r:
            assert (r.status, (await r.json())["error"]) == (400, "bad_request")
    async with api.http.post(f"{url}?kind=python", data=b"", headers=admin) as r:
        assert r.status == 400
    assert [a.version for a in api.org.store.list_apps() if a.name == "fresh"] == [1]


async def test_a_revoked_agent_loses_its_session_and_gets_no_more_work(api: Api) -> None:
    agent = api.org.agent()
    await agent.start()
    try:
        first = await submit(api, 2)
        await until(lambda: api.org.store.batch_status(first).done == 2, 30, "work before")
        (record,) = api.org.store.list_agents()
        url = f"{api.url}/api/v1/agents/{record.agent_id}/revoke"
        async with api.http.post(url, headers=api.auth("admin")) as r:
            answer = await r.json()
        assert r.status == 200 and answer["revoked"] is True
        api.org.server._load_trust()  # what the next tick does
        await until(lambda: bool(agent.stats.closed), 10, "the session closed")
    finally:
        await agent.stop()
    later = await submit(api, 3)
    counters = api.org.endpoint.counters
    before = counters["rejected_unknown_agent"]
    again = api.org.agent()  # the same key, trying again
    await again.start()
    try:
        await until(lambda: counters["rejected_unknown_agent"] > before, 30, "a refused HELLO")
    finally:
        await again.stop()
    for index in range(3):
        job = api.org.store.get_job_by_index(later, index)
        assert api.org.store.list_attempts(job.job_id) == []
    assert agent.stats.jobs == 2 and again.stats.jobs == 0
    nobody = f"{api.url}/api/v1/agents/ffff/revoke"
    async with api.http.post(nobody, headers=api.auth("admin")) as r:
        assert (r.status, (await r.json())["error"]) == (404, "unknown_agent")


async def test_an_overlong_header_is_one_quiet_line_not_a_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp refuses it before our middleware runs; its log must not carry a traceback
    a client can repeat at will, and the server must go on serving."""
    host, port = api.listener.address or ("", 0)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
            writer.write(b"x" * 10_000 + b"\r\n\r\n")
            await writer.drain()
            answer = await reader.read(4096)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400", answer[:100]
    assert "Traceback" not in caplog.text and "LineTooLong" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    async with api.http.get(f"{api.url}/api/v1/apps", headers=api.auth("read")) as r:
        assert r.status == 200


async def test_a_retired_version_is_refused_to_new_batches(api: Api) -> None:
    admin = api.auth("admin")
    url = f"{api.url}/api/v1/apps/{APP}/versions"
    async with api.http.post(f"{url}?kind=python", data=b"print(2)\n", headers=admin) as r:
        assert (await r.json())["version"] == 2
    async with api.http.post(f"{url}/2/retire", headers=admin) as r:
        assert (r.status, (await r.json())["retired"]) == (200, True)
    batch = await submit(api, 1)  # no version named: the newest one not retired
    assert api.org.store.get_batch(batch).app.version == 1
    headers = {**api.auth("submit"), "Content-Type": "application/x-ndjson"}
    body = ndjson({"app": APP, "version": 2}, {"json": 1})
    async with api.http.post(f"{api.url}/api/v1/batches", data=body, headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (409, "retired_app")
    async with api.http.post(f"{url}/1/retire", headers=admin) as r:
        assert r.status == 200
    body = ndjson({"app": APP}, {"json": 1})
    async with api.http.post(f"{api.url}/api/v1/batches", data=body, headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (409, "retired_app")
    async with api.http.post(f"{url}/9/retire", headers=admin) as r:
        assert (r.status, (await r.json())["error"]) == (404, "unknown_app")
    assert len(api.org.store.list_batches()) == 1


async def test_a_large_output_streams_in_pieces_and_arrives_whole(api: Api) -> None:
    """2.5 MiB of output: read from the store a chunk at a time, base64 in pieces."""
    from vcomp.loadgen import LiteAgent

    big = bytes(range(256)) * (10 << 10) + b"tail"
    body = ndjson({"app": APP, "output_bytes": 8 << 20}, {"json": 1})
    headers = {**api.auth("submit"), "Content-Type": "application/x-ndjson"}
    async with api.http.post(f"{api.url}/api/v1/batches", data=body, headers=headers) as r:
        batch = (await r.json())["batch"]
    org = api.org
    agent = LiteAgent(
        tpm=org.tpm,
        pinned=org.fingerprint,
        server=org.address,
        ephemeral=org.ephemeral,
        compute=lambda job: big,
    )
    await agent.start()
    try:
        url = f"{api.url}/api/v1/batches/{batch}/results?follow=true"
        async with api.http.get(url, headers=api.auth("read")) as r:
            text = await r.read()  # one line longer than aiohttp's readline allows
    finally:
        await agent.stop()
    (line,) = [json.loads(raw) for raw in text.split(b"\n") if raw.strip()]
    assert line["state"] == "done" and base64.b64decode(line["output_b64"]) == big
