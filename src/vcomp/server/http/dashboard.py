"""The dashboard page and its data (filled in by the dashboard work of issue 9)."""

from __future__ import annotations

from aiohttp import web

from vcomp.server.http.context import HttpContext


def register(app: web.Application, ctx: HttpContext) -> None:
    """Add the dashboard routes to ``app``."""
