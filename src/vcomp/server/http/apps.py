"""``/api/v1/apps``: the registered job code."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from vcomp.server.http.context import context_of
from vcomp.server.store.records import App


def app_json(app: App) -> dict[str, Any]:
    return {
        "name": app.name,
        "version": app.version,
        "kind": app.kind.value if hasattr(app.kind, "value") else str(app.kind),
        "sha256": app.sha256.hex(),
        "size": app.size,
        "created": app.created_at,
    }


async def list_apps(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    apps = await ctx.run(ctx.store.list_apps)
    return web.json_response({"apps": [app_json(a) for a in apps]})


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/apps", list_apps)
