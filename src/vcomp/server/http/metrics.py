"""``/metrics`` in Prometheus text format (filled in by the metrics work of issue 9)."""

from __future__ import annotations

from aiohttp import web

from vcomp.server.http.context import HttpContext


def register(app: web.Application, ctx: HttpContext) -> None:
    """Add the metrics routes to ``app``."""
