"""The dashboard: one static page at ``/`` and its data at ``GET /api/v1/dashboard``.

The page (``static/``: HTML, CSS, JS; no build step, no CDN) holds no data. Its
script reads a token from ``location.hash`` (``#token=...``), polls the snapshot
below every few seconds, and writes every string from the store as text
(``textContent``), never as markup; the page's Content-Security-Policy allows only its
own scripts, so even a slip there could not run an agent's "name".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from vcomp.server.http.agents import agent_json
from vcomp.server.http.batches import status_json
from vcomp.server.http.context import HttpContext, context_of
from vcomp.server.http.errors import HttpError

STATIC = Path(__file__).resolve().parent / "static"
RECENT_FAILURES = 20
REASON_CHARS = 500  # a failure's reason as shown; the job's own page has the whole text
MAX_AGENTS = 1000  # table rows, the most credited first

# Only the page's own files; the data comes from this origin's API.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def register(app: web.Application, ctx: HttpContext) -> None:
    """Add the dashboard routes to ``app``."""
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/v1/dashboard", snapshot)


_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
_FILES = {p.name for p in STATIC.iterdir() if p.suffix in _TYPES} if STATIC.is_dir() else set()


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES or name == "index.html":  # a fixed set: no path to walk
        raise HttpError(404, "not_found", "no such file")
    return _file(name)


def _file(name: str) -> web.Response:
    path = STATIC / name
    response = web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix])
    response.charset = "utf-8"
    response.headers.update(PAGE_HEADERS)
    return response


async def snapshot(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize_monitoring(request)
    return web.json_response(await build_snapshot(ctx))


async def build_snapshot(ctx: HttpContext) -> dict[str, Any]:
    # Four reads on the store's writer thread per poll (one page polls every 3 s).
    # store.status() counts every batch's jobs by state (indexed per batch), so its cost
    # grows with the store's history; fine for one operator's page, not for hundreds.
    store = ctx.store
    status = await ctx.run(store.status)
    agents = await ctx.run(store.list_agents)
    credit = await ctx.run(store.agent_credit)
    failures = await ctx.run(store.recent_failures, RECENT_FAILURES)
    now = time.time()
    rows = [agent_json(a, credit.get(a.agent_id), now) for a in agents]
    rows.sort(key=lambda a: (-a["cpu_seconds"], -a["jobs_done"], a["name"]))
    throughput = ctx.server.committer.throughput
    return {
        "generated": now,
        "agents_online": sum(1 for a in rows if a["connected"]),
        "agents_enrolled": len(rows),
        "agents": rows[:MAX_AGENTS],
        "batches": [status_json(b) for b in status.batches if not b.finished],
        "throughput": {
            "slot_seconds": throughput.slot_seconds,
            "results": throughput.series(now),
        },
        "failures": [
            {
                "batch": f.batch_id,
                "index": f.index,
                "job": f.job_id,
                "reason": f.reason[:REASON_CHARS],
                "finished": f.finished_at,
            }
            for f in failures
        ],
    }
