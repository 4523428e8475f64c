"""What the HTTP handlers share: the running server, its settings, and access checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from vcomp.server.http.auth import check_scope, presented_token, token_digest
from vcomp.server.http.settings import HttpSettings
from vcomp.server.store.interface import Store
from vcomp.server.store.records import ApiToken

if TYPE_CHECKING:
    from vcomp.server.service import OrganisationServer

T = TypeVar("T")

CONTEXT_KEY = web.AppKey("vcomp_context", object)


@dataclass
class HttpContext:
    server: OrganisationServer
    settings: HttpSettings

    @property
    def store(self) -> Store:
        return self.server.store

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking store call, off the event loop (on the store's writer thread)."""
        return await self.server.committer.run(fn, *args)

    async def authorize(self, request: web.Request, scope: str) -> ApiToken:
        """The request's token if it holds ``scope``; else HttpError 401/403."""
        token = presented_token(request)
        found = await self.run(self.store.find_token, token_digest(token))
        return check_scope(found, scope)

    async def authorize_monitoring(self, request: web.Request) -> None:
        """/metrics and the dashboard's data: ``read``, or nothing on an open loopback bind."""
        if self.settings.open_metrics and self.settings.loopback:
            return
        await self.authorize(request, "read")


def context_of(request: web.Request) -> HttpContext:
    ctx = request.app[CONTEXT_KEY]
    assert isinstance(ctx, HttpContext)
    return ctx
