"""``/api/v1/agents``: who volunteers, who is connected now, and what each gave."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from vcomp.errors import StoreError
from vcomp.server.http.context import context_of
from vcomp.server.http.errors import HttpError
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
        "revoked": a.revoked_at is not None,
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


async def revoke_agent(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "admin")
    agent_id = request.match_info["agent"].lower()
    try:
        revoked = await ctx.run(ctx.store.revoke_agent, agent_id)
    except StoreError:
        raise HttpError(404, "unknown_agent", f"no agent {agent_id[:64]!r}") from None
    credit = (await ctx.run(ctx.store.agent_credit)).get(revoked.agent_id)
    return web.json_response(agent_json(revoked, credit, time.time()))


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/agents", list_agents)
    app.router.add_post("/api/v1/agents/{agent}/revoke", revoke_agent)
