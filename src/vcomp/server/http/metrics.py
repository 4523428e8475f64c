"""``/metrics`` in Prometheus text format.

Nothing here runs per packet: a custom collector reads, at scrape time, the counters
the server keeps anyway (the endpoint's counters, the scheduler's stats, the group
committer's per-group tallies, the socket driver's per-burst byte totals) and asks
the store one question (queued jobs per app). Each scrape builds its own registry, so
two servers in one process (tests) never share series.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vcomp.server.commit_stats import HistogramSnapshot
from vcomp.server.http.context import HttpContext, context_of

if TYPE_CHECKING:
    from vcomp.server.service import OrganisationServer

# Handshake results: the endpoint's counter names (and the server's own tallies).
_HANDSHAKE_REFUSALS = {
    "rejected_unknown_agent": "unknown_agent",
    "rejected_version": "unsupported_version",
    "rejected_busy": "server_full",
    "rejected_agent_sessions": "agent_session_cap",
    "rejected_handshakes": "too_many_handshakes",
    "cookie_invalid": "bad_cookie",
}


# The text format every Prometheus reads; our names and labels are all plain ASCII,
# which generate_latest writes the same way in it.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Reading:
    """Everything one scrape reports, read on the event loop in one go."""

    server: OrganisationServer
    queued_by_app: Mapping[str, int]


def register(app: web.Application, ctx: HttpContext) -> None:
    """Add the metrics routes to ``app``."""
    app.router.add_get("/metrics", scrape)


async def scrape(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize_monitoring(request)
    queued = await ctx.run(ctx.store.queued_by_app)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(Reading(ctx.server, queued)))
    body = generate_latest(registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = TEXT_FORMAT
    return response


class ServerCollector(Collector):
    def __init__(self, reading: Reading) -> None:
        self._reading = reading

    def collect(self) -> Iterator[Metric]:
        server = self._reading.server
        stats, committer, endpoint = server.stats, server.committer, server.endpoint
        counters = endpoint.counters if endpoint is not None else {}

        attested, half_open = endpoint.sessions_open() if endpoint is not None else (0, 0)
        sessions = GaugeMetricFamily(
            "vcomp_sessions_active", "Sessions open on this server", labels=["state"]
        )
        sessions.add_metric(["established"], attested)
        sessions.add_metric(["handshaking"], half_open)
        yield sessions

        agents = endpoint.agents_connected() if endpoint is not None else 0
        yield GaugeMetricFamily(
            "vcomp_agents_online", "Distinct agents with an attested session here", value=agents
        )

        handshakes = CounterMetricFamily(
            "vcomp_handshakes", "Handshakes by how they ended", labels=["result"]
        )
        handshakes.add_metric(["established"], stats.sessions_established)
        handshakes.add_metric(["attestation_failed"], stats.handshakes_rejected)
        for name, result in _HANDSHAKE_REFUSALS.items():
            handshakes.add_metric([result], counters.get(name, 0))
        yield handshakes

        yield CounterMetricFamily(
            "vcomp_jobs_leased", "Job attempts leased to agents by this server", value=stats.leases
        )

        results = CounterMetricFamily(
            "vcomp_results",
            "Results committed to the store, by what the store did with them",
            labels=["outcome"],
        )
        for outcome, n in sorted(dict(committer.outcomes).items()):
            results.add_metric([outcome], n)
        yield results

        queued = GaugeMetricFamily(
            "vcomp_jobs_queued", "Jobs waiting for an agent, per app", labels=["app"]
        )
        for app, n in sorted(self._reading.queued_by_app.items()):
            queued.add_metric([app], n)
        yield queued

        yield _histogram(
            "vcomp_result_commit_seconds",
            "From a result's upload complete to its store transaction committed",
            committer.result_latency.snapshot(),
        )

        adapter = server.adapter
        traffic = [
            ("vcomp_udp_bytes_sent", "UDP payload bytes sent", "bytes_sent"),
            ("vcomp_udp_bytes_received", "UDP payload bytes received", "bytes_received"),
            ("vcomp_udp_datagrams_sent", "UDP datagrams sent", "datagrams_sent"),
            ("vcomp_udp_datagrams_received", "UDP datagrams received", "datagrams_received"),
        ]
        for name, text, attribute in traffic:
            value = getattr(adapter, attribute) if adapter is not None else 0
            yield CounterMetricFamily(name, text, value=value)

        retransmissions = endpoint.retransmissions() if endpoint is not None else 0
        yield CounterMetricFamily(
            "vcomp_retransmissions", "Packets sent again after a loss", value=retransmissions
        )


def _histogram(name: str, documentation: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    buckets = [(_le(b), n) for b, n in zip(snap.bounds, snap.cumulative, strict=False)]
    buckets.append(("+Inf", snap.count))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=snap.total)


def _le(bound: float) -> str:
    return repr(bound)
