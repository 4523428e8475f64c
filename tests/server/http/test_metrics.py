"""``/metrics``: parsed with prometheus_client's own parser, against a real server.

The counters are judged by what really happened (jobs the store holds as done,
agents that really connected, a stranger that really was turned away), not by
what the server says about itself elsewhere.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.hostile.harness import APP
from tests.integration.conftest import PI_PY, Lab, pi_inputs, wait_until
from tests.server.http.conftest import Api, start_api
from tests.udpproxy import Direction, Faults
from vcomp.server.http.app import HttpListener
from vcomp.server.http.settings import HttpSettings

JOBS = 6
POINTS = 20_000

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def samples_of(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of one sample name that the scrape really holds (absent is not 0 here)."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def scrape(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Samples:
    async with http.get(f"{url}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    running = Lab(tmp_path)
    try:
        yield running
    finally:
        await running.close()


async def test_a_scrape_shows_the_counters_move_as_real_jobs_complete(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    listener = HttpListener(org.server, HttpSettings(bind="127.0.0.1:0", open_metrics=True))
    await listener.start()
    lab.on_close(listener.stop)
    http = aiohttp.ClientSession()
    lab.on_close(http.close)
    org.add_app("pi", PI_PY)
    batch = org.submit("pi", pi_inputs(JOBS, POINTS))

    before = await scrape(http, listener.url, {})
    assert value(before, "vcomp_jobs_queued", app="pi") == JOBS
    assert value(before, "vcomp_agents_online") == 0
    assert value(before, "vcomp_results_total", outcome="accepted") == 0

    # A stranger (a TPM nobody enrolled) is turned away, and counted as such.
    stranger = lab.lite_tpm(org, "stranger", enroll=False)
    await lab.lite(stranger, org.address, org.fingerprint)
    await wait_until(
        lambda: (
            org.server.endpoint is not None
            and org.server.endpoint.counters["rejected_unknown_agent"] > 0
        ),
        "the stranger's HELLO",
    )

    agent = await lab.run_agent(lab.agent_config(org, "agent0"), org)
    await org.wait_batch(batch, timeout=120)
    done = org.store.batch_status(batch).done
    assert done == JOBS  # what the store holds, to compare the counters against
    await wait_until(lambda: agent.connected_sessions, "the agent's session")

    after = await scrape(http, listener.url, {})
    assert value(after, "vcomp_results_total", outcome="accepted") == JOBS
    assert value(after, "vcomp_jobs_leased_total") >= JOBS
    assert samples_of(after, "vcomp_jobs_queued") == {(("app", "pi"),): 0}  # drained reads 0
    assert value(after, "vcomp_agents_online") == 1
    assert value(after, "vcomp_sessions_active", state="established") >= 1
    assert value(after, "vcomp_handshakes_total", result="established") >= 1
    assert value(after, "vcomp_handshakes_total", result="unknown_agent") >= 1
    # Every result waited for a commit; each commit landed in some bucket.
    assert value(after, "vcomp_result_commit_seconds_count") == JOBS
    assert value(after, "vcomp_result_commit_seconds_bucket", le="+Inf") == JOBS
    assert value(after, "vcomp_result_commit_seconds_sum") > 0
    # The code, inputs and outputs crossed the socket: far more than the inputs alone.
    code_and_inputs = PI_PY.stat().st_size + sum(map(len, pi_inputs(JOBS, POINTS)))
    sent = value(after, "vcomp_udp_bytes_sent_total")
    received = value(after, "vcomp_udp_bytes_received_total")
    assert sent - value(before, "vcomp_udp_bytes_sent_total") > code_and_inputs
    assert received > value(before, "vcomp_udp_bytes_received_total")
    assert value(after, "vcomp_udp_datagrams_received_total") > JOBS


async def test_retransmissions_are_counted_and_outlive_their_session(lab: Lab) -> None:
    """A path that drops a fifth of the server's datagrams: the server must send again,
    and the total stays when the session that did it is gone."""
    org = lab.org()
    await lab.start(org)
    listener = HttpListener(org.server, HttpSettings(bind="127.0.0.1:0", open_metrics=True))
    await listener.start()
    lab.on_close(listener.stop)
    http = aiohttp.ClientSession()
    lab.on_close(http.close)
    proxy = await lab.proxy(org.address, to_agent=Faults(drop=0.2), seed=7)
    org.add_app("echo", b"tiny job")
    agent = await lab.lite(lab.lite_tpm(org, "lite"), proxy.address, org.fingerprint, org=org)
    batch = org.submit("echo", [b"%d" % i for i in range(30)])
    await org.wait_batch(batch, timeout=120)
    assert proxy.stats.of(Direction.TO_AGENT)["dropped"] > 0  # the path really lost some

    during = value(await scrape(http, listener.url, {}), "vcomp_retransmissions_total")
    assert during > 0
    await agent.stop()
    await wait_until(lambda: not org.server.endpoint or not org.server.endpoint.sessions, "close")
    closed = await scrape(http, listener.url, {})
    assert value(closed, "vcomp_retransmissions_total") >= during
    assert value(closed, "vcomp_sessions_active", state="established") == 0


async def test_every_registered_app_has_a_queued_series_even_when_it_is_empty(api: Api) -> None:
    """A series that vanishes when its app runs dry reads as "no data", not 0, to Prometheus;
    a retired app keeps its series only while jobs of it still wait."""
    store = api.org.store
    store.add_app("idle", "python", io.BytesIO(b"print('idle')"))  # never given a batch
    store.add_app("busy", "python", io.BytesIO(b"print('busy')"))
    store.create_batch("busy", [b"a", b"b"], max_attempts=1)
    store.add_app("gone", "python", io.BytesIO(b"print('gone')"))
    store.retire_app("gone", 1)  # nothing queued and retired: no series
    store.add_app("winding", "python", io.BytesIO(b"print('winding')"))
    store.create_batch("winding", [b"x"], max_attempts=1)
    store.retire_app("winding", 1)  # retired, but its batch still waits

    queued = samples_of(await scrape(api.http, api.url, api.auth("read")), "vcomp_jobs_queued")
    assert queued == {
        (("app", APP),): 0,  # the harness's app, also never given a batch
        (("app", "idle"),): 0,
        (("app", "busy"),): 2,
        (("app", "winding"),): 1,
    }


async def test_metrics_need_a_read_token(api: Api) -> None:
    url = f"{api.url}/metrics"
    async with api.http.get(url) as r:
        assert (r.status, (await r.json())["error"]) == (401, "missing_token")
    async with api.http.get(url, headers={"Authorization": "Bearer vct_nope"}) as r:
        assert (r.status, (await r.json())["error"]) == (401, "bad_token")
        body = await r.text()
    assert "vcomp_" not in body  # nothing of the metrics leaks with the refusal
    for scope in ("read", "submit", "admin"):
        samples = await scrape(api.http, api.url, api.auth(scope))
        assert ("vcomp_agents_online", ()) in samples


async def test_open_metrics_on_loopback_serves_metrics_and_nothing_else_without_a_token(
    tmp_path: Path,
) -> None:
    settings = HttpSettings(bind="127.0.0.1:0", open_metrics=True)
    api = await start_api(tmp_path, settings)
    try:
        samples = await scrape(api.http, api.url, {})
        assert ("vcomp_agents_online", ()) in samples
        # open_metrics opens the monitoring routes only: the API still wants its token.
        async with api.http.get(f"{api.url}/api/v1/agents") as r:
            assert (r.status, (await r.json())["error"]) == (401, "missing_token")
    finally:
        await api.http.close()
        await api.listener.stop()
        await api.org.server.stop()


async def test_a_store_outage_during_a_scrape_is_a_json_error_and_the_server_goes_on(
    api: Api,
) -> None:
    """The one store question of a scrape failing must not take the listener down."""
    api.org.store.close()  # a real failure: the store's connection is gone
    async with api.http.get(f"{api.url}/metrics", headers=api.auth("read")) as r:
        assert r.status >= 500
        answer = await r.json()
    assert answer["error"] in ("internal", "store_unavailable")
    assert "Traceback" not in answer["message"]
