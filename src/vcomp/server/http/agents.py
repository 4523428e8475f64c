"""``/api/v1/agents``: who volunteers, who is connected now, and what each gave."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from vcomp.server.http.context import context_of
from vcomp.server.store.records import CONNECTED_SECONDS, AgentCredit, AgentRecord


def agent_json(a: AgentRecord, credit: AgentCredit | None, now: float) -> dict[str, Any]:
    seen = a.last_seen
    return {
        "id": a.agent_id,
        "name": a.name,
        "connected": seen is not None and now - seen <= CONNECTED_SECONDS,
        "last_seen": seen,
        "jobs_done": credit.jobs_done if credit else 0,
        "cpu_seconds": credit.cpu_seconds if credit else 0.0,
        "enrolled": a.enrolled_at,
    }


async def list_agents(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    agents = await ctx.run(ctx.store.list_agents)
    credit = await ctx.run(ctx.store.agent_credit)
    now = time.time()
    return web.json_response(
        {"agents": [agent_json(a, credit.get(a.agent_id), now) for a in agents]}
    )


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/agents", list_agents)
